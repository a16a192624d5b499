-- KotaDB gateway: gives every JSON error the gateway sends the API's one error shape.
--
-- Loaded by the Lua HTTP filter listed first in envoy.yaml.tmpl's chain, so on the response
-- path it is the last filter: it sees what the transcoder wrote and the local replies of every
-- filter after it, once local_reply_config has rendered them. The API's shape (docs/design.md
-- §3, services/common/errors.py: error_body) is exactly {"code","message","reason","details"}
-- in that order, with reason equal to details[0].reason. Two producers miss it:
--
-- * the transcoder (convert_grpc_status) renders a service's google.rpc.Status as
--   {"code","message","details"}, with no reason: it is taken from details[0], the ErrorInfo,
--   and inserted. A Status without an ErrorInfo first (one gRPC itself produced: a deadline, an
--   oversize message) gets an ErrorInfo and a RequestInfo in front of its details, its reason
--   the code's name;
-- * local_reply_config's json_format always sorts keys ({"code","details","message","reason"}):
--   the members are put back in the API's order.
--
-- No header is added: x-kotadb-error-reason stays the mark of an answer from the gateway or
-- Check (clients and tests tell those from a service's answer by it). Only error
-- responses with a JSON body are read: a status below 400 or a non-JSON content type (native
-- gRPC clients, NDJSON streams) returns at once, so successes pass through untouched and
-- unbuffered. An error body is buffered up to the connection's buffer limit (32 KiB by
-- default); a google.rpc.Status is far smaller. A body in the right shape already, or one that
-- is not an error object of these members (/health's status), is left as it is.

local CODE_NAMES = {
  [1] = "CANCELLED", [2] = "UNKNOWN", [3] = "INVALID_ARGUMENT", [4] = "DEADLINE_EXCEEDED",
  [5] = "NOT_FOUND", [6] = "ALREADY_EXISTS", [7] = "PERMISSION_DENIED",
  [8] = "RESOURCE_EXHAUSTED", [9] = "FAILED_PRECONDITION", [10] = "ABORTED",
  [11] = "OUT_OF_RANGE", [12] = "UNIMPLEMENTED", [13] = "INTERNAL", [14] = "UNAVAILABLE",
  [15] = "DATA_LOSS", [16] = "UNAUTHENTICATED",
}
local ERROR_INFO = '{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"'
local MEMBERS = { code = true, message = true, reason = true, details = true }
-- The largest error body shaped: under the 32 KiB connection buffer (gateway.py's default),
-- which is all a filter may buffer.
local MAX_BODY = 30000

-- string_end returns the index of the quote closing the JSON string whose opening quote is at
-- `start`, or nil when the text ends first. Escapes are skipped two bytes at a time.
local function string_end(text, start)
  local at = start + 1
  while true do
    local found = string.find(text, '["\\]', at)
    if found == nil then
      return nil
    end
    if string.byte(text, found) == 34 then
      return found
    end
    at = found + 2
  end
end

-- value_end returns the index just past the compact JSON value starting at `at`, or nil.
local function value_end(text, at)
  local first = string.byte(text, at)
  if first == 34 then
    local closing = string_end(text, at)
    return closing and closing + 1
  end
  if first ~= 123 and first ~= 91 then
    local _, stop = string.find(text, "^[%w%.%+%-]+", at) -- a number, true, false or null
    return stop and stop + 1
  end
  local depth, scan = 0, at
  while true do
    local found = string.find(text, '[][{}"]', scan)
    if found == nil then
      return nil
    end
    local byte = string.byte(text, found)
    if byte == 34 then
      local closing = string_end(text, found)
      if closing == nil then
        return nil
      end
      scan = closing + 1
    else
      depth = (byte == 123 or byte == 91) and depth + 1 or depth - 1
      scan = found + 1
      if depth == 0 then
        return scan
      end
    end
  end
end

-- members splits a compact JSON object into its members' raw values and the order of their
-- names; nil when `text` is not an object of the error's members alone.
local function members(text)
  if string.byte(text, 1) ~= 123 then
    return nil
  end
  local values, order, at = {}, {}, 2
  while true do
    local name_end = string.byte(text, at) == 34 and string_end(text, at)
    if not name_end or string.byte(text, name_end + 1) ~= 58 then
      return nil
    end
    local name = string.sub(text, at + 1, name_end - 1)
    local stop = value_end(text, name_end + 2)
    if not MEMBERS[name] or values[name] ~= nil or stop == nil then
      return nil
    end
    values[name] = string.sub(text, name_end + 2, stop - 1)
    order[#order + 1] = name
    local separator = string.byte(text, stop)
    if separator == 125 then
      if string.find(text, "^%s*$", stop + 1) == nil then
        return nil
      end
      return values, order, string.sub(text, stop + 1)
    end
    if separator ~= 44 then
      return nil
    end
    at = stop + 1
  end
end

-- shaped returns `text` in the API's error shape, or nil when it already has
-- that shape or is not an error of these members.
local function shaped(text, request_id)
  local values, order, trailer = members(text)
  if values == nil or values.code == nil or values.message == nil or values.details == nil then
    return nil
  end
  local details, reason = values.details, nil
  if values.reason ~= nil then
    reason = string.match(values.reason, '^"([A-Z][A-Z0-9_]*)"$')
    if reason == nil then
      return nil
    end
    if order[1] == "code" and order[2] == "message" and order[3] == "reason" then
      return nil
    end
  else
    if string.sub(details, 2, #ERROR_INFO + 1) == ERROR_INFO then
      reason = string.match(details, '^([A-Z][A-Z0-9_]*)"', #ERROR_INFO + 2)
    end
    if reason == nil then
      reason = CODE_NAMES[tonumber(values.code)] or "UNKNOWN"
      local head = ERROR_INFO .. reason .. '","domain":"kotadb.dev","metadata":{"request_id":"'
        .. request_id .. '"}},{"@type":"type.googleapis.com/google.rpc.RequestInfo","requestId":"'
        .. request_id .. '"}'
      details = "[" .. head .. (details == "[]" and "]" or "," .. string.sub(details, 2))
    end
  end
  return '{"code":' .. values.code .. ',"message":' .. values.message .. ',"reason":"' .. reason
    .. '","details":' .. details .. "}" .. trailer
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = tonumber(headers:get(":status"))
  if status == nil or status < 400 then
    return
  end
  local content_type = headers:get("content-type")
  if content_type == nil or string.find(content_type, "application/json", 1, true) ~= 1 then
    return
  end
  -- A body that says it is larger than the connection buffer would fail the response if it
  -- were buffered; it passes unshaped instead.
  local length = tonumber(headers:get("content-length"))
  if length ~= nil and length > MAX_BODY then
    return
  end
  -- Request ids are Envoy's UUIDs; anything else is not echoed into JSON unescaped.
  local request_id = headers:get("x-request-id") or ""
  if string.match(request_id, "^[%w%-_.]*$") == nil then
    request_id = ""
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local text = shaped(body:getBytes(0, body:length()), request_id)
  if text == nil then
    return
  end
  body:setBytes(text)
  -- Waiting for the body ended the first header handle's scope; the headers themselves are
  -- still held back, so a new handle may change them.
  headers = handle:headers()
  if headers:get("content-length") ~= nil then
    headers:replace("content-length", tostring(#text))
  end
end
