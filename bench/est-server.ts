// The server side of bench/est-enrolment.bench.ts, run as a child process (forked with an IPC channel)
// so that the benchmark's clients and the server do not share one event loop.
//
//   HALLMARK_PASSPHRASE=… node dist/bench/est-server.js HOME
//
// Opens the authority in HOME and starts the listeners exactly as `hallmark serve` does (same
// startServers, same pino logger at the same level, logging to stderr), except that the per-client
// EST rate limit is off (estPerClientPerMinute: 0): every benchmark client comes from 127.0.0.1.
// Ports are chosen by the system. Messages on the IPC channel:
//   child → parent  { type: 'ready', httpsUrl }                  listening
//   parent → child  { type: 'stats' }  → { type: 'stats', … }    CPU used so far and certificates stored
//   parent → child  { type: 'stop' }                             close everything and exit 0
// Exiting normally (not by a signal) lets `--cpu-prof` write its profile.

import { Authority } from '../src/authority/authority.js';
import { createLogger } from '../src/log.js';
import { startServers } from '../src/server/servers.js';

export interface ServerStats {
  readonly type: 'stats';
  /** process.cpuUsage() of the server process (µs), all threads. */
  readonly cpuUserUs: number;
  readonly cpuSystemUs: number;
  /** Rows in `certificates` (committed). */
  readonly certificates: number;
}

const home = process.argv[2];
const passphrase = process.env.HALLMARK_PASSPHRASE;
if (!home || !passphrase || !process.send) {
  process.stderr.write('usage: HALLMARK_PASSPHRASE=… node dist/bench/est-server.js HOME (forked, with an IPC channel)\n');
  process.exit(2);
}

const send = (m: unknown): Promise<void> => new Promise((resolve) => process.send!(m, undefined, {}, () => resolve()));

const authority = await Authority.open(home, passphrase);
const servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(), estPerClientPerMinute: 0 });
let stopping = false;
const stop = async (): Promise<void> => {
  if (stopping) return;
  stopping = true;
  await servers.close();
  await authority.close();
  process.exit(0);
};
process.on('message', (m: { type?: string }) => {
  if (m?.type === 'stop') void stop();
  else if (m?.type === 'stats') {
    void (async () => {
      const cpu = process.cpuUsage();
      const r = await authority.store.db.selectFrom('certificates').select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow();
      await send({ type: 'stats', cpuUserUs: cpu.user, cpuSystemUs: cpu.system, certificates: Number(r.n) } satisfies ServerStats);
    })();
  }
});
// The parent went away without saying stop: do not linger.
process.on('disconnect', () => void stop());
process.once('SIGTERM', () => void stop());
await send({ type: 'ready', httpsUrl: servers.httpsUrl });
