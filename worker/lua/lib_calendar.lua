-- UTC calendar arithmetic on epoch milliseconds (Redis Lua has no os.time/os.date).
-- Civil-from-days / days-from-civil after H. Hinnant's public-domain algorithms; every value
-- stays an exact integer in a double.

local MS_DAY = 86400000

local function fdiv(a, b)
  return math.floor(a / b)
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = fdiv(y, 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = fdiv(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + fdiv(yoe, 4) - fdiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = fdiv(z, 146097)
  local doe = z - era * 146097
  local yoe = fdiv(doe - fdiv(doe, 1460) + fdiv(doe, 36524) - fdiv(doe, 146096), 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + fdiv(yoe, 4) - fdiv(yoe, 100))
  local mp = fdiv(5 * doy + 2, 153)
  local d = doy - fdiv(153 * mp + 2, 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function is_leap(y)
  return (y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0
end

local DIM = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31}

local function days_in_month(y, m)
  if m == 2 and is_leap(y) then return 29 end
  return DIM[m]
end

local function shift_month(y, m, n)
  local idx = y * 12 + (m - 1) + n
  return fdiv(idx, 12), idx % 12 + 1
end

local function anchor_start(y, m, anchor)
  local d = math.min(anchor, days_in_month(y, m))
  return days_from_civil(y, m, d) * MS_DAY
end

local function ymd_of(ms)
  return civil_from_days(fdiv(ms, MS_DAY))
end

-- The billing cycle [start, end) containing t for an anchor day.
local function cycle_containing(t, anchor)
  local y, m = ymd_of(t)
  local s = anchor_start(y, m, anchor)
  if t >= s then
    local ny, nm = shift_month(y, m, 1)
    return s, anchor_start(ny, nm, anchor)
  end
  local py, pm = shift_month(y, m, -1)
  return anchor_start(py, pm, anchor), s
end

-- First anchor boundary strictly after start (a changed anchor may shorten one cycle).
local function next_cycle_end(start, anchor)
  local y, m = ymd_of(start)
  local c = anchor_start(y, m, anchor)
  if c > start then return c end
  local ny, nm = shift_month(y, m, 1)
  return anchor_start(ny, nm, anchor)
end

-- Same day and time n calendar months later, the day clamped to the month's end.
local function add_months(t, n)
  local days = fdiv(t, MS_DAY)
  local tod = t - days * MS_DAY
  local y, m, d = civil_from_days(days)
  local ny, nm = shift_month(y, m, n)
  local nd = math.min(d, days_in_month(ny, nm))
  return days_from_civil(ny, nm, nd) * MS_DAY + tod
end
