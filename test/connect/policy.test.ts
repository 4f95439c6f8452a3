// Product connection policies: parsing with clear refusals, {udid} placeholders, MQTT topic matching.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { HallmarkError } from '../../src/errors.js';
import { DEFAULT_POLICY, filterMatches, parsePolicy, permissionsFor, topicAllowed } from '../../src/connect/policy.js';

const badRequest = (pattern: RegExp) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, String(err));
  assert.equal(err.code, 'BAD_REQUEST');
  assert.match(err.message, pattern);
  return true;
};

test('null, undefined and empty text are the default policy', () => {
  assert.equal(parsePolicy(null), DEFAULT_POLICY);
  assert.equal(parsePolicy(undefined), DEFAULT_POLICY);
  assert.equal(parsePolicy('  '), DEFAULT_POLICY);
  assert.deepEqual(permissionsFor(DEFAULT_POLICY, 'ab12'), { publish: ['devices/ab12/#'], subscribe: ['devices/ab12/commands/#'] });
});

test('a valid policy parses; a missing list is empty; {udid} is filled in everywhere', () => {
  const p = parsePolicy(JSON.stringify({ mqtt: { publish: ['t/{udid}/x/{udid}', 'a/+/b', '#'] } }));
  assert.deepEqual(p.mqtt.subscribe, []);
  assert.deepEqual(permissionsFor(p, 'ff00').publish, ['t/ff00/x/ff00', 'a/+/b', '#']);
});

test('bad policies are refused with BAD_REQUEST saying why', () => {
  assert.throws(() => parsePolicy('{not json'), badRequest(/not JSON/));
  assert.throws(() => parsePolicy('[]'), badRequest(/JSON object/));
  assert.throws(() => parsePolicy('{"mqtt": []}'), badRequest(/policy\.mqtt must be an object/));
  assert.throws(() => parsePolicy('{"mqtt": {}, "http": {}}'), badRequest(/unknown policy field "http"/));
  assert.throws(() => parsePolicy('{"mqtt": {"publish": "a/b"}}'), badRequest(/publish must be an array/));
  assert.throws(() => parsePolicy('{"mqtt": {"publish": [1]}}'), badRequest(/publish\[0\] must be a string/));
  assert.throws(() => parsePolicy('{"mqtt": {"publish": [""]}}'), badRequest(/is empty/));
  assert.throws(() => parsePolicy('{"mqtt": {"publish": ["a/#/b"]}}'), badRequest(/'#' must be a whole level and the last/));
  assert.throws(() => parsePolicy('{"mqtt": {"subscribe": ["a/b#"]}}'), badRequest(/'#'/));
  assert.throws(() => parsePolicy('{"mqtt": {"subscribe": ["a/x+/b"]}}'), badRequest(/'\+' must be a whole level/));
  assert.throws(() => parsePolicy('{"mqtt": {"subscribe": ["a/{tenant}/b"]}}'), badRequest(/unknown placeholder \{tenant\}/));
  assert.throws(() => parsePolicy('{"mqtt": {"subscribe": ["a/{udid/b"]}}'), badRequest(/unbalanced/));
  assert.throws(() => parsePolicy(JSON.stringify({ mqtt: { publish: Array.from({ length: 65 }, (_, i) => `t/${i}`) } })), badRequest(/over the limit of 64/));
  assert.throws(() => parsePolicy(JSON.stringify({ mqtt: { publish: ['x'.repeat(20_000)] } })), badRequest(/over 16384 bytes/));
  assert.throws(() => parsePolicy(JSON.stringify({ mqtt: { publish: ['x'.repeat(600)] } })), badRequest(/over 512 characters/));
});

test('MQTT wildcard matching: + is one level, # the rest including the parent, $ topics not matched by a leading wildcard', () => {
  const yes: [string, string][] = [
    ['a/b/c', 'a/b/c'], ['a/+/c', 'a/b/c'], ['a/+/c', 'a//c'], ['+/+/+', 'a/b/c'], ['a/#', 'a'], ['a/#', 'a/b'], ['a/#', 'a/b/c/d'],
    ['#', 'a/b'], ['#', '/'], ['+', 'a'], ['+/b', '/b'], ['a/+', 'a/'], ['$SYS/#', '$SYS/broker'], ['a/+/#', 'a/b'],
  ];
  const no: [string, string][] = [
    ['a/b/c', 'a/b'], ['a/b', 'a/b/c'], ['a/+/c', 'a/b/d'], ['a/+', 'a/b/c'], ['a/+', 'a'], ['+', 'a/b'], ['a/#', 'ab'],
    ['a/#', 'b/a'], ['#', '$SYS/broker'], ['+/broker', '$SYS/broker'], ['A/b', 'a/b'], ['a/b', 'a/bc'], ['a/bc', 'a/b'],
  ];
  for (const [f, t] of yes) assert.equal(filterMatches(f, t), true, `${f} should match ${t}`);
  for (const [f, t] of no) assert.equal(filterMatches(f, t), false, `${f} should not match ${t}`);
});

test('topicAllowed: concrete topics only, against a device\'s permissions', () => {
  const udid = '0a1b2c';
  const { publish, subscribe } = permissionsFor(DEFAULT_POLICY, udid);
  assert.equal(topicAllowed(publish, `devices/${udid}/telemetry`), true);
  assert.equal(topicAllowed(publish, `devices/${udid}`), true);
  assert.equal(topicAllowed(publish, 'devices/ffffff/telemetry'), false);
  assert.equal(topicAllowed(subscribe, `devices/${udid}/commands/reboot`), true);
  assert.equal(topicAllowed(subscribe, `devices/${udid}/telemetry`), false);
  // A topic name carrying wildcards, empty or with NUL is never allowed, even by '#'.
  assert.equal(topicAllowed(['#'], 'a/+/b'), false);
  assert.equal(topicAllowed(['#'], 'a/#'), false);
  assert.equal(topicAllowed(['#'], ''), false);
  assert.equal(topicAllowed(['#'], 'a\u0000b'), false);
  assert.equal(topicAllowed([], 'a'), false);
  const lamp = permissionsFor(parsePolicy('{"mqtt":{"publish":["lamps/{udid}/+/state","fleet/+/announce"]}}'), udid);
  assert.equal(topicAllowed(lamp.publish, `lamps/${udid}/kitchen/state`), true);
  assert.equal(topicAllowed(lamp.publish, `lamps/${udid}/kitchen/power`), false);
  assert.equal(topicAllowed(lamp.publish, 'fleet/anything/announce'), true);
});
