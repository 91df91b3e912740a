-- lib_band (a library, not a script: other scripts include it with "--!include")
-- The due index's finished band, as keys.py's FINISHED_BAND (2^50): a finished
-- transaction's entry is scored FINISHED_BAND + ms when its hash expires. Scores in the
-- band have 16 digits, so scripts pass them on through string.format('%d', ...):
-- Redis would hand a bare Lua number on with 14 significant digits.

local FINISHED_BAND = 1125899906842624
