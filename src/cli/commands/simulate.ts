// `hallmark simulate`: N simulated devices against a running Hallmark server and MQTT broker, with the
// same simulator core as the demo (src/demo/simulator.ts).

import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Fleet, formatStats } from '../../demo/simulator.js';
import { HallmarkError } from '../../errors.js';
import { flag, intOption, out, required, str, UsageError, type Command } from '../io.js';

function duration(text: string | undefined, what: string, fallback: number): number {
  if (text === undefined) return fallback;
  const m = /^(\d{1,7})(ms|s|m|h)?$/.exec(text.trim());
  if (!m) throw new UsageError(`${what} must be a duration such as 30s, 2m, 500ms: ${JSON.stringify(text)}`);
  const ms = Number(m[1]) * ({ ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] ?? 's'] ?? 1000);
  if (ms < 100) throw new UsageError(`${what} must be at least 100ms`);
  return ms;
}

export const simulateCommand: Command = {
  name: 'simulate',
  summary: 'N simulated devices: enrol over EST with a claim, connect over MQTT/TLS, heartbeat, print a summary',
  usage: `Usage: hallmark simulate --devices N --server URL --broker mqtts://HOST:PORT --trust ROOT.pem --claim ID:SECRET
                         [--heartbeat 5s] [--duration 30s] [--concurrency 16] [--json]

Each device gets its own P-256 key (in memory), enrols with the claim (which needs N uses in a batch
that allows unregistered keys), connects to the broker with its certificate trusting only --trust,
and publishes a QoS 1 heartbeat on devices/<UDID>/heartbeat every --heartbeat for --duration. Then it
prints a summary: enrolled, connected (and still connected), refused with the reasons (enrolment or
connection), sessions the broker ended with the reasons (e.g. DISCONNECT 0x98 administrative action:
a device revoked or suspended while "hallmark serve --broker-dir" keeps the broker in step; a device
does not reconnect by itself), heartbeats (and those the broker refused), latencies (p50, p99).
Exits 1 unless every device enrolled and connected.
  --claim ID:SECRET   or HALLMARK_CLAIM`,
  options: {
    devices: { type: 'string' }, server: { type: 'string' }, broker: { type: 'string' }, trust: { type: 'string' }, claim: { type: 'string' },
    heartbeat: { type: 'string' }, duration: { type: 'string' }, concurrency: { type: 'string' }, json: { type: 'boolean' },
  },
  async run(args) {
    const usage = this.usage;
    const devices = intOption(args, 'devices');
    if (!devices) throw new UsageError(`--devices N (at least 1) is required\n\n${usage}`);
    const server = required(args, 'server', usage);
    const broker = required(args, 'broker', usage);
    if (!/^mqtts:\/\//i.test(broker)) throw new UsageError(`--broker must be mqtts://HOST:PORT\n\n${usage}`);
    const trustFile = required(args, 'trust', usage);
    let trust: string;
    try { trust = readFileSync(trustFile, 'utf8'); } catch (err) { throw new HallmarkError('BAD_REQUEST', `cannot read ${trustFile}: ${(err as NodeJS.ErrnoException).code}`); }
    const claim = str(args, 'claim') ?? process.env.HALLMARK_CLAIM;
    if (!claim || !/^[^:\s]+:\S+$/.test(claim)) throw new UsageError(`--claim ID:SECRET (or HALLMARK_CLAIM) is required\n\n${usage}`);
    const heartbeatMs = duration(str(args, 'heartbeat'), '--heartbeat', 5000);
    const durationMs = duration(str(args, 'duration'), '--duration', 30_000);
    const json = flag(args, 'json');
    const log = json ? () => {} : (line: string) => out(line);
    const stateDir = await mkdtemp(join(tmpdir(), 'hallmark-simulate-'));
    const fleet = new Fleet({ server, broker, trust, claim, stateDir, devices, heartbeatMs, concurrency: intOption(args, 'concurrency'), log });
    let stopped = false;
    const onSignal = (): void => { stopped = true; };
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    try {
      log(`${devices} devices: enrolling at ${server}`);
      await fleet.enrolAll();
      log(`connecting to ${broker}`);
      await fleet.connectAll();
      log(`publishing a heartbeat every ${heartbeatMs} ms for ${durationMs} ms`);
      const end = Date.now() + durationMs;
      while (!stopped && Date.now() < end) await new Promise((r) => setTimeout(r, Math.min(250, end - Date.now())));
      const stats = fleet.stats();
      if (json) out(JSON.stringify(stats, null, 2));
      else { out('summary:'); for (const line of formatStats(stats)) out(line); }
      return stats.enrolled === devices && stats.connected === devices ? 0 : 1;
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      await fleet.stop();
      await rm(stateDir, { recursive: true, force: true });
    }
  },
};
