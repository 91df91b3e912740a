-- lib_expect (a library, not a script: other scripts include it with "--!include")
-- Defines status_in(list, status): whether status is one of the comma-separated list,
-- the compare half of every compare-and-set.

local function status_in(list, status)
  if list == status then
    return true  -- a list of one, as most are: no pattern matching
  end
  for s in string.gmatch(list, '[^,]+') do
    if s == status then
      return true
    end
  end
  return false
end
