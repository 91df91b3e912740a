-- lib_band (a library, not a script: other scripts include it with "--!include")
-- The due index's band of the sweep's schedule, as keys.py's FINISHED_BAND (2^50): above
-- it each listing bucket has an entry, named by the bucket's label and scored
-- FINISHED_BAND + ms when the sweep should next look at it; no claim looks there. Scores
-- in the band have 16 digits, so scripts pass them on through string.format('%d', ...):
-- Redis would hand a bare Lua number on with 14 significant digits.

local FINISHED_BAND = 1125899906842624
