// The SQLite writer thread (see sqlite-writer.ts): its own connection to the database file, and the
// group commit engine running procedures there. Everything here blocks only this thread: the
// statements, the COMMIT's WAL writes and fsync, waiting for another connection's write lock.

import { readlinkSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import BetterSqlite3 from 'better-sqlite3';
import { Kysely, SqliteDialect, sql, type Transaction } from 'kysely';
import { HallmarkError } from '../errors.js';
import { MAX_BATCH, SavepointPolicy, commitGroup, type UnitOfWork } from './group-commit.js';
import { loadProcedure } from './procedures.js';
import type { Database } from './schema.js';
import { reusingStatements } from './sqlite-statements.js';
import { commitOrRollback } from './sqlite-transaction.js';
import type { SerializedError, WriterData, WriterReady, WriterReply, WriterRequest, WriterUnit } from './sqlite-writer.js';

const data = workerData as WriterData;
const port = parentPort!;

const sqlite = new BetterSqlite3(data.file, { fileMustExist: true });
sqlite.pragma('journal_mode = WAL');
sqlite.pragma(`synchronous = ${data.synchronous}`);
sqlite.pragma('foreign_keys = ON');
sqlite.pragma(`busy_timeout = ${data.busyTimeoutMs}`);
sqlite.pragma(`wal_autocheckpoint = ${data.autocheckpoint}`);
const db = new Kysely<Database>({ dialect: new SqliteDialect({ database: reusingStatements(sqlite) }) });

/** [0]: transactions of the serving thread's own connection waiting for or holding the write lock. */
const mainWriters = new Int32Array(data.lock);

/**
 * Lets a write transaction of the serving thread go first: it polls for the lock with back-off, and
 * this thread, committing group after group, would otherwise almost always hold it. Bounded, so that a
 * mistake (a main-thread transaction waiting for this thread) costs a delay, never a deadlock.
 */
function yieldToMainWriters(): void {
  const deadline = Date.now() + data.busyTimeoutMs;
  for (let n = Atomics.load(mainWriters, 0); n > 0 && Date.now() < deadline; n = Atomics.load(mainWriters, 0)) {
    Atomics.wait(mainWriters, 0, n, 50);
  }
}

async function writeTransaction<T>(fn: (trx: Transaction<Database>) => Promise<T>): Promise<T> {
  yieldToMainWriters();
  return db.connection().execute(async (conn) => {
    await sql`begin immediate`.execute(conn);
    return commitOrRollback(conn, fn);
  });
}

export function serializeError(err: unknown): SerializedError {
  const e = err as { name?: string; message?: string; code?: unknown };
  const extra: Record<string, unknown> = {};
  if (err && typeof err === 'object') {
    for (const [k, v] of Object.entries(err)) {
      if (k === 'code' || k === 'status' || k === 'cause' || k === 'name' || k === 'message' || k === 'stack') continue;
      if (v === null || ['string', 'number', 'boolean'].includes(typeof v)) extra[k] = v;
    }
  }
  return {
    hallmark: err instanceof HallmarkError,
    name: typeof e?.name === 'string' ? e.name : 'Error',
    message: typeof e?.message === 'string' ? e.message : String(err),
    code: typeof e?.code === 'string' ? e.code : undefined,
    extra,
  };
}

const policy = new SavepointPolicy();
let queue: WriterUnit[] = [];
let flushing = false;
let closing = false;

async function flush(): Promise<void> {
  while (queue.length > 0) {
    const batch = queue.splice(0, MAX_BATCH);
    let replies: WriterReply['results'];
    try {
      const procedures = await Promise.all(batch.map((u) => loadProcedure(u.module, u.name)));
      const units: UnitOfWork<unknown>[] = batch.map((u, i) => (trx, dialect) => procedures[i]!.run(trx, dialect, u.args));
      const { outcomes, refused } = await commitGroup(writeTransaction, 'sqlite', units, policy.startWithSavepoints());
      policy.record(refused);
      replies = batch.map((u, i) => {
        const o = outcomes[i]!;
        return o.ok ? { id: u.id, ok: true, value: o.value } : { id: u.id, ok: false, error: serializeError(o.error) };
      });
    } catch (err) {
      // The transaction as a whole failed (or its only unit did): nothing of it was kept.
      const error = serializeError(err);
      replies = batch.map((u) => ({ id: u.id, ok: false, error }));
    }
    port.postMessage({ type: 'done', results: replies } satisfies WriterReply);
  }
  flushing = false;
  if (closing) finish();
}

function finish(): void {
  void db.destroy().finally(() => process.exit(0)); // closes the connection
}

port.on('message', (m: WriterRequest) => {
  if (m.type === 'units') {
    queue.push(...m.units);
    if (!flushing) {
      flushing = true;
      setImmediate(() => void flush());
    }
  } else if (m.type === 'autocheckpoint') {
    sqlite.pragma(`wal_autocheckpoint = ${m.pages}`);
  } else if (m.type === 'close') {
    closing = true;
    if (!flushing) finish();
  }
});
let threadId: number | undefined;
try {
  threadId = Number(readlinkSync('/proc/thread-self').split('/').pop()) || undefined;
} catch { /* not Linux */ }
port.postMessage({ type: 'ready', threadId } satisfies WriterReady);
