// SQLite writes off the event loop. better-sqlite3 is synchronous: every statement of an enrolment's
// transaction, and above all the COMMIT (its WAL page writes and fsync), blocked the serving thread —
// measured ~30 % of a busy EST server's main thread (~2.7 ms per group commit of ~16 enrolments, half of
// it pwrite of WAL frames). A long-running server instead hands its group commits to a worker thread with
// its own connection to the same file: the serving thread sends a procedure (procedures.ts) and its
// arguments and gets the outcome back once the transaction holding it has committed — durability is
// unchanged (same synchronous setting, nothing resolves before its COMMIT returned).
//
// The serving thread's own connection keeps every read and the other (rarer) write transactions;
// SQLite's write lock orders the two connections, and the writer lets a waiting main-thread transaction
// go first (a shared counter), so those cannot starve behind back-to-back group commits.
//
// If the thread dies, every unit it held is rejected (DATABASE_UNAVAILABLE: whether it committed is not
// known) and the next unit starts a new thread. close() lets the queued units finish first.

import { Worker } from 'node:worker_threads';
import { HallmarkError, type ErrorCode } from '../errors.js';
import type { Procedure } from './procedures.js';

/** workerData of the writer thread. */
export interface WriterData {
  readonly file: string;
  readonly synchronous: 'FULL' | 'NORMAL';
  readonly busyTimeoutMs: number;
  readonly autocheckpoint: number;
  /** SharedArrayBuffer(4): main-thread write transactions waiting for or holding the lock. */
  readonly lock: SharedArrayBuffer;
}

export interface WriterUnit {
  readonly id: number;
  readonly module: string;
  readonly name: string;
  readonly args: unknown;
}

export type WriterRequest =
  | { readonly type: 'units'; readonly units: readonly WriterUnit[] }
  | { readonly type: 'autocheckpoint'; readonly pages: number }
  | { readonly type: 'close' };

export interface SerializedError {
  readonly hallmark: boolean;
  readonly name: string;
  readonly message: string;
  readonly code?: string;
  readonly extra: Readonly<Record<string, unknown>>;
}

export interface WriterReply {
  readonly type: 'done';
  readonly results: readonly ({ readonly id: number; readonly ok: true; readonly value: unknown } | { readonly id: number; readonly ok: false; readonly error: SerializedError })[];
}

/** The writer thread is running; `threadId` is its OS thread id where /proc says it (Linux). */
export interface WriterReady {
  readonly type: 'ready';
  readonly threadId?: number;
}

/** An error as the writer thread reported it, rebuilt (a HallmarkError stays one, with its extra fields). */
export function deserializeError(e: SerializedError): Error {
  const err = e.hallmark && e.code ? new HallmarkError(e.code as ErrorCode, e.message) : Object.assign(new Error(e.message), { name: e.name }, e.code ? { code: e.code } : {});
  return Object.assign(err, e.extra);
}

interface Waiting {
  resolve(value: unknown): void;
  reject(err: unknown): void;
}

export class SqliteWriter {
  readonly #data: WriterData;
  readonly #waiting = new Map<number, Waiting>();
  #worker: Worker | undefined;
  #nextId = 1;
  #outbox: WriterUnit[] = [];
  #posting = false;
  #closed = false;
  #autocheckpoint: number;
  #groups = 0;
  #units = 0;
  #threadId: number | undefined;

  constructor(data: WriterData) {
    this.#data = data;
    this.#autocheckpoint = data.autocheckpoint;
  }

  /** Starts the thread (and opens its connection) now rather than with the first unit. */
  start(): void {
    if (!this.#closed) this.#ensureWorker();
  }

  /** Units handed over and not yet answered. */
  get pending(): number {
    return this.#waiting.size;
  }

  /** Transactions committed (or failed) and units they held, since start; the thread's OS thread id (Linux) for CPU accounting. */
  get stats(): { readonly groups: number; readonly units: number; readonly threadId: number | undefined } {
    return { groups: this.#groups, units: this.#units, threadId: this.#threadId };
  }

  /** Resolves with the procedure's result once the transaction holding it has committed. */
  run<A, R>(procedure: Procedure<A, R>, args: A): Promise<R> {
    if (this.#closed) return Promise.reject(new HallmarkError('DATABASE_UNAVAILABLE', 'the store is closed'));
    const id = this.#nextId++;
    return new Promise<R>((resolve, reject) => {
      this.#waiting.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.#outbox.push({ id, module: procedure.module, name: procedure.name, args });
      // Everything asked for in one turn of the event loop crosses in one message.
      if (!this.#posting) {
        this.#posting = true;
        setImmediate(() => this.#post());
      }
    });
  }

  /** wal_autocheckpoint of the writer's connection (0 while a checkpointer thread runs). */
  setAutocheckpoint(pages: number): void {
    this.#autocheckpoint = pages;
    if (!this.#closed) this.#worker?.postMessage({ type: 'autocheckpoint', pages } satisfies WriterRequest);
  }

  #post(): void {
    this.#posting = false;
    if (this.#outbox.length === 0) return;
    const units = this.#outbox;
    this.#outbox = [];
    try {
      const worker = this.#ensureWorker();
      worker.ref(); // units in flight keep the process alive until they are answered
      worker.postMessage({ type: 'units', units } satisfies WriterRequest);
    } catch (err) {
      // Arguments that cannot be cloned (a bug in the caller), or no thread could be started.
      for (const u of units) this.#settle(u.id, false, err);
    }
  }

  #ensureWorker(): Worker {
    if (this.#worker) return this.#worker;
    const worker = new Worker(new URL('./sqlite-writer-worker.js', import.meta.url), { workerData: { ...this.#data, autocheckpoint: this.#autocheckpoint } });
    worker.unref(); // an idle writer does not keep the process alive (see #post and #settle)
    worker.on('message', (m: WriterReply | WriterReady) => {
      if (m.type === 'ready') {
        this.#threadId = m.threadId;
        return;
      }
      this.#groups++;
      this.#units += m.results.length;
      for (const r of m.results) this.#settle(r.id, r.ok, r.ok ? r.value : deserializeError(r.error));
    });
    let failure: Error | undefined;
    worker.on('error', (err) => { failure = err; });
    worker.on('exit', (code) => {
      if (this.#worker === worker) this.#worker = undefined;
      if (this.#waiting.size === 0) return;
      // Whatever it held may or may not have committed; its callers learn that nothing is certain.
      const reason = failure ? failure.message : `exit code ${code}`;
      const err = new HallmarkError('DATABASE_UNAVAILABLE', `the store's writer thread stopped (${reason}); whether the write was kept is not known`, { cause: failure });
      for (const id of [...this.#waiting.keys()]) this.#settle(id, false, err);
    });
    this.#worker = worker;
    return worker;
  }

  #settle(id: number, ok: boolean, value: unknown): void {
    const w = this.#waiting.get(id);
    if (!w) return;
    this.#waiting.delete(id);
    if (this.#waiting.size === 0 && this.#outbox.length === 0) this.#worker?.unref();
    if (ok) w.resolve(value);
    else w.reject(value);
  }

  /** Finishes the units already handed over, then closes the connection and stops the thread. */
  async close(timeoutMs = 10_000): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#post();
    const worker = this.#worker;
    if (!worker) return;
    const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
    worker.ref();
    worker.postMessage({ type: 'close' } satisfies WriterRequest);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([exited, new Promise<void>((resolve) => { timer = setTimeout(resolve, timeoutMs); })]);
    clearTimeout(timer);
    await worker.terminate().catch(() => 0);
  }

  /** For tests: stops the thread abruptly, as a crash would. */
  async terminateForTest(): Promise<void> {
    await this.#worker?.terminate();
  }
}
