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
// HALLMARK_BENCH_EST_PROCESSES=N (N > 1): this process becomes a node:cluster primary that forks N server
// processes sharing the listening ports (each accepts its own connections); stats add them up.

import cluster, { type Worker } from 'node:cluster';
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
  /** The store's writer thread (SQLite): its OS thread id, and the group commits and units it has run. */
  readonly writer?: { readonly threadId?: number; readonly groups: number; readonly units: number };
  /** The server processes (more than one with HALLMARK_BENCH_EST_PROCESSES) and their writer threads, for per-thread CPU. */
  readonly processes?: readonly { readonly pid: number; readonly writerTid?: number }[];
}

const home = process.argv[2];
const passphrase = process.env.HALLMARK_PASSPHRASE;
if (!home || !passphrase || !process.send) {
  process.stderr.write('usage: HALLMARK_PASSPHRASE=… node dist/bench/est-server.js HOME (forked, with an IPC channel)\n');
  process.exit(2);
}
/** HALLMARK_BENCH_EST_PROCESSES > 1: that many server processes (node:cluster) share the listening ports. */
const processes = Math.max(1, Number(process.env.HALLMARK_BENCH_EST_PROCESSES ?? 1) || 1);

const send = (m: unknown): Promise<void> => new Promise((resolve) => process.send!(m, undefined, {}, () => resolve()));

if (processes > 1 && cluster.isPrimary) await runPrimary();
else await runServer();

/** One server process (the only one, or a cluster worker talking to the primary). */
async function runServer(): Promise<void> {
  const authority = await Authority.open(home!, passphrase!);
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
        // (Read loosely, so this file also builds against a tree from before the writer thread, for comparisons.)
        const writer = (authority.store as { writer?: { stats: ServerStats['writer'] } }).writer?.stats;
        await send({ type: 'stats', cpuUserUs: cpu.user, cpuSystemUs: cpu.system, certificates: Number(r.n), ...(writer ? { writer } : {}), processes: [{ pid: process.pid, writerTid: writer?.threadId }] } satisfies ServerStats);
      })();
    }
  });
  // The parent went away without saying stop: do not linger.
  process.on('disconnect', () => void stop());
  process.once('SIGTERM', () => void stop());
  await send({ type: 'ready', httpsUrl: servers.httpsUrl });
}

/** The cluster primary: forks the servers (they accept on the shared ports themselves), relays stats and stop. */
async function runPrimary(): Promise<void> {
  cluster.schedulingPolicy = cluster.SCHED_NONE; // each server accepts its own connections (no hand-off through this process)
  const workers = Array.from({ length: processes }, () => cluster.fork());
  const urls = await Promise.all(workers.map((w) => new Promise<string>((resolve, reject) => {
    w.on('message', function ready(m: { type?: string; httpsUrl?: string }) {
      if (m?.type === 'ready') { w.off('message', ready); resolve(m.httpsUrl!); }
    });
    w.once('exit', (code) => reject(new Error(`an EST server process exited with code ${code} before listening`)));
  })));
  if (new Set(urls).size !== 1) throw new Error(`the server processes listen on different addresses: ${urls.join(', ')}`);
  const ask = (w: Worker): Promise<ServerStats> => new Promise((resolve) => {
    w.on('message', function stats(m: ServerStats) {
      if (m?.type === 'stats') { w.off('message', stats); resolve(m); }
    });
    w.send({ type: 'stats' });
  });
  let stopping = false;
  const stop = async (): Promise<void> => {
    if (stopping) return;
    stopping = true;
    await Promise.all(workers.map((w) => new Promise<void>((resolve) => {
      if (w.isDead()) return resolve();
      w.once('exit', () => resolve());
      w.send({ type: 'stop' });
    })));
    process.exit(0);
  };
  process.on('message', (m: { type?: string }) => {
    if (m?.type === 'stop') void stop();
    else if (m?.type === 'stats') {
      void (async () => {
        const all = await Promise.all(workers.map(ask));
        const cpu = process.cpuUsage();
        const writers = all.map((x) => x.writer).filter((w) => w !== undefined);
        await send({
          type: 'stats', cpuUserUs: cpu.user + all.reduce((n, x) => n + x.cpuUserUs, 0), cpuSystemUs: cpu.system + all.reduce((n, x) => n + x.cpuSystemUs, 0),
          certificates: all[0]!.certificates,
          ...(writers.length ? { writer: { groups: writers.reduce((n, w) => n + w!.groups, 0), units: writers.reduce((n, w) => n + w!.units, 0) } } : {}),
          processes: all.flatMap((x) => x.processes ?? []),
        } satisfies ServerStats);
      })();
    }
  });
  process.on('disconnect', () => void stop());
  process.once('SIGTERM', () => void stop());
  await send({ type: 'ready', httpsUrl: urls[0] });
}
