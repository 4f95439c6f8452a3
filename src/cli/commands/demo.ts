// `hallmark demo` (npm run demo): the whole story on one machine — see src/demo/demo.ts.

import { HallmarkError } from '../../errors.js';
import { flag, intOption, out, type Command } from '../io.js';
import { runDemo } from '../../demo/demo.js';

export const demoCommand: Command = {
  name: 'demo',
  summary: 'one-machine demo: authority, servers, Mosquitto, N simulated devices, a revocation and a clone',
  usage: `Usage: hallmark demo [--devices 100] [--json] [--keep]

Initialises a fresh authority in a temporary directory, starts the servers in this process and the
machine's Mosquitto (/usr/sbin/mosquitto) on free ports, enrols N simulated devices over EST with a claim,
connects them over MQTT/TLS and lets them publish heartbeats; then revokes one device (refused at its
next connection while the others keep publishing) and presents a clone (another device's certificate
with a different key), which is refused. Stops everything at the end.
  --devices N   simulated devices (default 100, at least 3)
  --json        print the summary as JSON at the end
  --keep        keep the temporary directory`,
  options: { devices: { type: 'string' }, json: { type: 'boolean' }, keep: { type: 'boolean' } },
  async run(args) {
    const devices = intOption(args, 'devices') ?? 100;
    if (devices < 3) throw new HallmarkError('BAD_REQUEST', '--devices must be at least 3');
    const summary = await runDemo({ devices, keep: flag(args, 'keep'), log: (line) => out(line) });
    if (flag(args, 'json')) out(JSON.stringify(summary, null, 2));
    const ok = summary.enrolled === devices && summary.connected === devices && summary.revoked.refused
      && summary.othersHeartbeatsAfterRevocation > 0 && summary.clone.refused;
    out(ok ? 'result: OK — all enrolled and connected, the revoked device and the clone refused, the others kept publishing'
      : `result: NOT AS EXPECTED ${JSON.stringify({ enrolled: summary.enrolled, connected: summary.connected, revoked: summary.revoked.refused, othersAfter: summary.othersHeartbeatsAfterRevocation, clone: summary.clone.refused })}`);
    return ok ? 0 : 1;
  },
};
