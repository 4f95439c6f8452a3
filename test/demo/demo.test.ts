// `npm run demo` end to end with 10 devices: the real Mosquitto (/usr/sbin/mosquitto), the servers in
// this process. The revoked device's open session is ended by the broker within a second (dynamic
// security plugin) and its next connection refused. Outside CI a missing mosquitto skips with the
// reason; under CI=true it fails.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { MOSQUITTO_BINARY, runDemo } from '../../src/demo/demo.js';

const haveMosquitto = existsSync(MOSQUITTO_BINARY);
const skip = !haveMosquitto && process.env.CI !== 'true' ? 'mosquitto not installed (apt-get install mosquitto)' : false;

/** Pids of running mosquitto processes started with a hallmark-demo configuration. */
function demoMosquittos(): number[] {
  if (!existsSync('/proc')) return [];
  const pids: number[] = [];
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const cmd = readFileSync(`/proc/${p}/cmdline`, 'utf8');
      if (cmd.includes('mosquitto') && cmd.includes('hallmark-demo-')) pids.push(Number(p));
    } catch { /* gone */ }
  }
  return pids;
}

test('runDemo: 10 devices enrol and connect, the revoked one and a clone are refused, the others keep publishing', { skip, timeout: 120_000 }, async () => {
  assert.ok(haveMosquitto, `${MOSQUITTO_BINARY} is required under CI=true (apt-get install mosquitto)`);
  const lines: string[] = [];
  const s = await runDemo({ devices: 10, log: (l) => lines.push(l) });
  const diag = `${JSON.stringify(s, null, 1)}\n${lines.join('\n')}`;
  assert.equal(s.devices, 10);
  assert.equal(s.enrolled, 10, diag);
  assert.equal(s.connected, 10, diag);
  assert.ok(s.heartbeats >= 10, diag);
  assert.ok(s.latencyMs.enrol.n === 10 && s.latencyMs.enrol.p50 > 0 && s.latencyMs.enrol.p99 >= s.latencyMs.enrol.p50, diag);
  assert.ok(s.latencyMs.connect.n >= 10, diag);

  assert.ok(s.revoked.refused, diag);
  assert.match(`${s.revoked.code} ${s.revoked.error}`, /revoked/i, diag);
  assert.equal(s.revoked.disconnectReason, 'DISCONNECT 0x98 administrative action', diag);
  assert.ok(s.revoked.disconnectedMs !== undefined && s.revoked.disconnectedMs < 1000, diag);
  assert.equal(s.disconnected.count, 0, 'the stats were taken before the revocation');
  assert.ok(s.othersHeartbeatsAfterRevocation >= 9, diag);
  assert.equal(s.othersConnectedAtEnd, 9, diag);

  assert.ok(s.clone.refused, diag);
  assert.notEqual(s.clone.certificateOf, s.clone.keyOf);
  assert.ok(s.clone.error, diag);
  if (s.clone.mosquittoPub) assert.ok(s.clone.mosquittoPub.refused, diag);

  assert.equal(lines.at(-1), 'demo finished', diag);
  assert.deepEqual(demoMosquittos(), [], 'no mosquitto left running');
  assert.equal(existsSync(s.dataDir), false);
});
