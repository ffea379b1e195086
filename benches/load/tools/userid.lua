-- wrk script: every request carries an x-user-id drawn at random from a fixed pool of
-- 10,000 ids (user1 .. user10000), so the 90/10 sticky split is exercised. The requests are
-- preformatted once per thread so the generator spends its time sending, not in Lua.
local pool = 10000
local reqs = {}

function init(args)
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0))
  for i = 1, pool do
    reqs[i] = wrk.format("GET", "/", { ["Host"] = "bench.local", ["x-user-id"] = "user" .. i })
  end
end

function request()
  return reqs[math.random(pool)]
end
