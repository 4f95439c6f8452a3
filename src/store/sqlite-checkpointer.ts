// WAL checkpoints off the event loop. SQLite copies the write-ahead log back into the database file
// when it passes 1,000 pages, inside whichever COMMIT crosses that mark — on the event loop, since
// better-sqlite3 is synchronous: measured ~9 % of a busy EST server's main thread. A long-running
// server instead turns automatic checkpoints off and lets a worker thread, with its own connection,
// run PASSIVE checkpoints (they never block readers or writers) every interval. If the worker stops
// for any reason, automatic checkpoints are turned back on, so the log cannot grow without bound.

import { Worker } from 'node:worker_threads';
import type BetterSqlite3 from 'better-sqlite3';

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const Database = require(workerData.module);
const db = new Database(workerData.file, { fileMustExist: true });
db.pragma('busy_timeout = 5000');
let timer = setInterval(() => {
  try { db.pragma('wal_checkpoint(PASSIVE)'); } catch (err) { parentPort.postMessage({ error: String(err && err.message || err) }); }
}, workerData.intervalMs);
parentPort.on('message', (m) => {
  if (m === 'stop') { clearInterval(timer); try { db.pragma('wal_checkpoint(PASSIVE)'); db.close(); } catch {} process.exit(0); }
});
`;

export interface Checkpointer { stop(): Promise<void> }

/** `onAutocheckpoint`: told each wal_autocheckpoint setting made on `db`, for other connections of this process (the writer thread). */
export function checkpointInBackground(db: BetterSqlite3.Database, file: string, module: string, intervalMs = 500, onAutocheckpoint?: (pages: number) => void): Checkpointer {
  db.pragma('wal_autocheckpoint = 0');
  const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { file, module, intervalMs } });
  worker.unref();
  let stopped = false;
  const fallBack = (): void => {
    if (!stopped && db.open) {
      db.pragma('wal_autocheckpoint = 1000');
      onAutocheckpoint?.(1000);
    }
  };
  worker.on('error', fallBack);
  worker.on('exit', fallBack);
  return {
    async stop() {
      if (stopped) return;
      stopped = true;
      const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
      worker.postMessage('stop');
      await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 2000))]);
      await worker.terminate().catch(() => 0);
      if (db.open) db.pragma('wal_autocheckpoint = 1000');
      onAutocheckpoint?.(1000);
    },
  };
}
