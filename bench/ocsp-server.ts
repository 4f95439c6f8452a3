// The server side of bench/ocsp.bench.ts, run as a child process (forked with an IPC channel) so that
// the benchmark's clients and the server do not share one event loop.
//
//   HALLMARK_PASSPHRASE=… node dist/bench/ocsp-server.js HOME
//
// Opens the authority in HOME and starts the listeners exactly as `hallmark serve` does (startServers,
// the same pino logger at the same level, logging to stderr): OCSP is POST /ocsp on the plain HTTP
// listener. Beside it, for the ceiling, a second plain HTTP app built by the same buildHttpApp (same
// Fastify options, logger, error handling, public/OCSP/CRL routes) with one extra route,
// GET /hello -> "hello world", on its own port. That route exists only here, never in src/.
// Messages on the IPC channel:
//   child → parent  { type: 'ready', httpUrl, helloUrl }            listening
//   parent → child  { type: 'stats' }  → { type: 'stats', … }       the OCSP responder's counters
//   parent → child  { type: 'stop' }                                close everything and exit 0
// Exiting normally (not by a signal) lets `--cpu-prof` write its profile.

import type { AddressInfo } from 'node:net';
import { Authority } from '../src/authority/authority.js';
import { createLogger } from '../src/log.js';
import { ocspResponderFor } from '../src/protocols/ocsp/routes.js';
import type { OcspStats } from '../src/protocols/ocsp/responder.js';
import { buildHttpApp, startServers } from '../src/server/servers.js';

export interface OcspServerStats extends OcspStats {
  readonly type: 'stats';
  readonly cacheSize: number;
}

const home = process.argv[2];
const passphrase = process.env.HALLMARK_PASSPHRASE;
if (!home || !passphrase || !process.send) {
  process.stderr.write('usage: HALLMARK_PASSPHRASE=… node dist/bench/ocsp-server.js HOME (forked, with an IPC channel)\n');
  process.exit(2);
}

const send = (m: unknown): Promise<void> => new Promise((resolve) => process.send!(m, undefined, {}, () => resolve()));

const logger = createLogger();
const authority = await Authority.open(home, passphrase);
// One load generator is one client address: the per-client budgets (EST, OCSP on-demand signing) are off.
const servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger, estPerClientPerMinute: 0, ocspOnDemandPerMinute: 0 });
const hello = await buildHttpApp(authority, logger);
hello.get('/hello', async () => 'hello world');
await hello.listen({ host: '127.0.0.1', port: 0 });
const helloUrl = `http://127.0.0.1:${(hello.server.address() as AddressInfo).port}/hello`;

let stopping = false;
const stop = async (): Promise<void> => {
  if (stopping) return;
  stopping = true;
  await hello.close();
  await servers.close();
  await authority.close();
  process.exit(0);
};
process.on('message', (m: { type?: string }) => {
  if (m?.type === 'stop') void stop();
  else if (m?.type === 'stats') {
    const responder = ocspResponderFor(authority);
    void send({ type: 'stats', ...responder.stats, cacheSize: responder.cacheSize } satisfies OcspServerStats);
  }
});
// The parent went away without saying stop: do not linger.
process.on('disconnect', () => void stop());
process.once('SIGTERM', () => void stop());
await send({ type: 'ready', httpUrl: servers.httpUrl, helloUrl });
