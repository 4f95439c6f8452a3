// The one store: Kysely over SQLite (better-sqlite3, WAL, synchronous=FULL) by default, or
// PostgreSQL when a postgres:// URL is given (HALLMARK_DATABASE_URL).

import { chmodSync } from 'node:fs';
import BetterSqlite3 from 'better-sqlite3';
import { Kysely, Migrator, PostgresDialect, SqliteDialect, sql, type Transaction } from 'kysely';
import { commitOrRollback } from './sqlite-transaction.js';
import { reusingStatements } from './sqlite-statements.js';
import { checkpointInBackground, type Checkpointer } from './sqlite-checkpointer.js';
import { SqliteWriter } from './sqlite-writer.js';
import { GroupCommitter, type UnitOfWork } from './group-commit.js';
import type { Procedure } from './procedures.js';
import { createRequire } from 'node:module';
import pg from 'pg';
import { HallmarkError } from '../errors.js';
import { StaticMigrationProvider } from './migrations.js';
import type { Database } from './schema.js';

export type Dialect = 'sqlite' | 'postgres';
export type Db = Kysely<Database>;
export type Trx = Transaction<Database> | Kysely<Database>;

/** How long a SQLite writer waits for another to release the write lock. */
const SQLITE_LOCK_WAIT_MS = 10_000;

export interface StoreOptions {
  /** postgres://… for PostgreSQL; otherwise a SQLite file path (or ':memory:'). */
  readonly url: string;
}

export class Store {
  readonly db: Db;
  readonly dialect: Dialect;
  readonly #description: string;
  /** The better-sqlite3 handle (SQLite only), to take the write lock without blocking the event loop. */
  readonly #sqlite: BetterSqlite3.Database | undefined;
  /** The pg pool Kysely runs on (PostgreSQL only), for named statements (preparedRead). */
  readonly #pool: pg.Pool | undefined;
  #checkpointer: Checkpointer | undefined;
  /** SQLite: write transactions of this connection waiting for or holding the write lock (read by the writer thread). */
  readonly #mainWriters = new Int32Array(new SharedArrayBuffer(4));
  #writer: SqliteWriter | undefined;
  #committer: GroupCommitter | undefined;

  private constructor(db: Db, dialect: Dialect, description: string, sqlite?: BetterSqlite3.Database, pool?: pg.Pool) {
    this.db = db;
    this.dialect = dialect;
    this.#description = description;
    this.#sqlite = sqlite;
    this.#pool = pool;
  }

  /** Opens the database, checks that it answers, and brings its schema up to date. */
  static async open(options: StoreOptions): Promise<Store> {
    const url = options.url;
    let store: Store;
    if (/^postgres(ql)?:\/\//.test(url)) {
      const pool = new pg.Pool({ connectionString: url, max: 8, connectionTimeoutMillis: 5000 });
      pool.on('error', () => { /* idle client errors surface on the next query */ });
      store = new Store(new Kysely<Database>({ dialect: new PostgresDialect({ pool }) }), 'postgres', redactUrl(url), undefined, pool);
    } else {
      let sqlite: BetterSqlite3.Database;
      try {
        sqlite = new BetterSqlite3(url);
      } catch (err) {
        throw new HallmarkError('DATABASE_UNAVAILABLE', `cannot open SQLite database ${url}: ${(err as Error).message}`, { cause: err });
      }
      if (url !== ':memory:') chmodSync(url, 0o600); // token hashes and the audit log: owner only
      sqlite.pragma('journal_mode = WAL');
      // FULL: a commit is on disk before it returns, so nothing is handed out before it is durable.
      sqlite.pragma('synchronous = FULL');
      sqlite.pragma('foreign_keys = ON');
      sqlite.pragma(`busy_timeout = ${SQLITE_LOCK_WAIT_MS}`);
      store = new Store(new Kysely<Database>({ dialect: new SqliteDialect({ database: reusingStatements(sqlite) }) }), 'sqlite', url, sqlite);
    }
    try {
      await sql`select 1`.execute(store.db);
    } catch (err) {
      await store.db.destroy().catch(() => {});
      throw new HallmarkError('DATABASE_UNAVAILABLE', `database unavailable (${store.#description}): ${(err as Error).message}`, { cause: err });
    }
    await store.migrate();
    return store;
  }

  async migrate(): Promise<void> {
    const migrator = new Migrator({ db: this.db, provider: new StaticMigrationProvider(this.dialect) });
    const { error, results } = await migrator.migrateToLatest();
    if (error) {
      const failed = results?.find((r) => r.status === 'Error')?.migrationName;
      throw new HallmarkError('DATABASE_UNAVAILABLE', `database migration ${failed ?? ''} failed: ${(error as Error).message}`, { cause: error });
    }
  }

  /**
   * Runs `fn` in a write transaction that holds the store's write lock from its first statement:
   * BEGIN IMMEDIATE on SQLite (another process waits instead of failing on upgrade), and a
   * transaction-scoped advisory lock on PostgreSQL. The audit chain needs this total order.
   */
  async writeTransaction<T>(fn: (trx: Transaction<Database>) => Promise<T>): Promise<T> {
    if (this.dialect === 'postgres') {
      return this.db.transaction().execute(async (trx) => {
        await sql`select pg_advisory_xact_lock(7216013)`.execute(trx);
        return fn(trx);
      });
    }
    return this.db.connection().execute(async (conn) => {
      // The writer thread (writeInBackground) lets this transaction have the lock next.
      Atomics.add(this.#mainWriters, 0, 1);
      try {
        await this.#beginImmediate(conn);
        return await commitOrRollback(conn, fn);
      } finally {
        Atomics.sub(this.#mainWriters, 0, 1);
        Atomics.notify(this.#mainWriters, 0);
      }
    });
  }

  /**
   * Runs a procedure (procedures.ts) in a write transaction shared with others that arrive meanwhile
   * (group commit, group-commit.ts), in the writer thread when one runs (writeInBackground), in this
   * thread otherwise. Resolves with its result once that transaction has committed; rejects with the
   * procedure's error when it refused (its writes rolled back, the others' kept).
   */
  commit<A, R>(procedure: Procedure<A, R>, args: A): Promise<R> {
    if (this.#writer) return this.#writer.run(procedure, args);
    return this.commitWork((trx, dialect) => procedure.run(trx, dialect, args));
  }

  /** Group commit of a unit of work given as a function: always in this thread, on this connection. */
  commitWork<T>(work: UnitOfWork<T>): Promise<T> {
    this.#committer ??= new GroupCommitter(this);
    return this.#committer.run(work);
  }

  /**
   * For long-running servers on SQLite: commit() runs in a writer thread with its own connection
   * (sqlite-writer.ts), so statements, WAL writes and fsync leave the event loop. A no-op on PostgreSQL
   * and in-memory databases. Stopped by close(), after the units handed to it have finished.
   */
  writeInBackground(): void {
    if (!this.#sqlite || this.#writer || this.#description === ':memory:') return;
    this.#writer = new SqliteWriter({
      file: this.#description, synchronous: 'FULL', busyTimeoutMs: SQLITE_LOCK_WAIT_MS,
      autocheckpoint: Number(this.#sqlite.pragma('wal_autocheckpoint', { simple: true })), lock: this.#mainWriters.buffer as SharedArrayBuffer,
    });
    this.#writer.start();
  }

  /** The writer thread, when one runs (tests). */
  get writer(): SqliteWriter | undefined {
    return this.#writer;
  }

  /**
   * BEGIN IMMEDIATE, waiting for another writer asynchronously. better-sqlite3 is synchronous, so
   * letting busy_timeout do the waiting would block this thread's event loop, and with it a holder of
   * the lock in the same process (another Store on the same file): a deadlock until SQLITE_BUSY.
   */
  async #beginImmediate(conn: Kysely<Database>): Promise<void> {
    const sqlite = this.#sqlite!;
    const deadline = Date.now() + SQLITE_LOCK_WAIT_MS;
    for (let delay = 1; ; delay = Math.min(delay * 2, 25)) {
      sqlite.pragma('busy_timeout = 0');
      try {
        await sql`begin immediate`.execute(conn);
        return;
      } catch (err) {
        if ((err as { code?: string }).code !== 'SQLITE_BUSY' || Date.now() >= deadline) throw err;
      } finally {
        sqlite.pragma(`busy_timeout = ${SQLITE_LOCK_WAIT_MS}`);
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }

  /**
   * PostgreSQL: a read outside any transaction, as a named statement on the pool. Each connection
   * parses and plans it once and then only binds and executes it: a planned three-table join costs the
   * server ~0.1-1 ms of planning per call otherwise, more than the read itself (and Kysely's builder
   * ~30 µs of event-loop time). `name` must always be given with the same `text`. Results are the
   * pool's rows, typed as Kysely would return them (the same pool and type parsers).
   */
  async preparedRead<R>(name: string, text: string, values: readonly unknown[]): Promise<R[]> {
    if (!this.#pool) throw new Error('Store.preparedRead is for PostgreSQL stores');
    const result = await this.#pool.query<R & pg.QueryResultRow>({ name, text, values: values as unknown[] });
    return result.rows;
  }

  /**
   * For long-running servers on SQLite: WAL checkpoints in a worker thread instead of inside commits on
   * the event loop (sqlite-checkpointer.ts). A no-op on PostgreSQL and in-memory databases. Stopped by close().
   */
  checkpointInBackground(intervalMs = 500): void {
    if (!this.#sqlite || this.#checkpointer || this.#description === ':memory:') return;
    this.#checkpointer = checkpointInBackground(this.#sqlite, this.#description, createRequire(import.meta.url).resolve('better-sqlite3'), intervalMs,
      (pages) => this.#writer?.setAutocheckpoint(pages));
    this.#writer?.setAutocheckpoint(0);
  }

  async close(): Promise<void> {
    // Units already handed to a group commit finish first (the writer thread's, then this thread's).
    await this.#writer?.close();
    await this.#committer?.drain();
    await this.#checkpointer?.stop();
    this.#checkpointer = undefined;
    await this.db.destroy();
  }

  describe(): string {
    return `${this.dialect} ${this.#description}`;
  }
}

export function redactUrl(url: string): string {
  return url.replace(/\/\/([^:@/]+):[^@/]*@/, '//$1:***@');
}

export const nowIso = (date = new Date()): string => date.toISOString();
