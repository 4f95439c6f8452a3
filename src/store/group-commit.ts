// Group commit for units of work that each decide something in the store (a device issuance: take
// quota, spend a claim, record the certificate). Work that arrives while a commit is in flight runs in
// the next transaction; the audit entries of the units that succeeded are appended once at the end, and
// everything commits with one fsync. Each caller's promise settles only after the transaction holding
// its work has committed (or failed), so nothing is returned before it is durable.
//
// One unit's refusal (quota used up, claim spent) must roll back only that unit. The group first runs
// without savepoints; only if a unit refuses is the whole transaction rolled back and the group run
// again with one SAVEPOINT per unit. Why: a savepoint makes SQLite copy every page a unit touches into
// the statement journal before changing it (subjournalPageIfRequired: ~8 % of the EST server's main
// thread, all for rollbacks that almost never happen), and costs PostgreSQL two round trips per unit.
// After a refusal the next few groups use savepoints from the start (a quota running out refuses many).
//
// Why group at all: one enrolment is a few microseconds of SQL but a whole fsync (and on PostgreSQL a
// round trip per statement plus a commit); committing them together is what lets enrolment approach the
// signing rate. The same engine runs in the SQLite writer thread (sqlite-writer.ts).

import { sql, type Transaction } from 'kysely';
import { appendAudit, type AuditEvent } from '../audit/audit-log.js';
import type { Dialect, Store } from './database.js';
import type { Database } from './schema.js';

export type UnitOfWork<T> = (trx: Transaction<Database>, dialect: Dialect) => Promise<{ result: T; audit: readonly AuditEvent[] }>;

export type Outcome = { readonly ok: true; readonly value: unknown } | { readonly ok: false; readonly error: unknown };

export type WriteTransaction = <T>(fn: (trx: Transaction<Database>) => Promise<T>) => Promise<T>;

/** Units per transaction: bounds how long one commit holds the write lock. */
export const MAX_BATCH = 128;
/** Groups that use savepoints from the start after one whose optimistic run met a refusal. */
const CAUTIOUS_GROUPS = 8;

/** A unit refused during the optimistic run: roll everything back and run the group with savepoints. */
class UnitRefused extends Error {}

/**
 * Runs a group of units in write transactions and says how each ended. Throws when the transaction as a
 * whole failed (then none of it was kept). `savepoints` false tries the optimistic run first.
 */
export async function commitGroup(writeTransaction: WriteTransaction, dialect: Dialect, units: readonly UnitOfWork<unknown>[], savepoints: boolean): Promise<{ outcomes: Outcome[]; refused: boolean }> {
  if (units.length > 1 && !savepoints) {
    try {
      const outcomes = await writeTransaction(async (trx) => {
        const audit: AuditEvent[] = [];
        const out: Outcome[] = [];
        for (const unit of units) {
          let done: Awaited<ReturnType<UnitOfWork<unknown>>>;
          try {
            done = await unit(trx, dialect);
          } catch {
            throw new UnitRefused();
          }
          audit.push(...done.audit);
          out.push({ ok: true, value: done.result });
        }
        await appendAudit(trx, audit);
        return out;
      });
      return { outcomes, refused: false };
    } catch (err) {
      if (!(err instanceof UnitRefused)) throw err;
      // Rolled back: run the group again, each unit in its own savepoint.
    }
  }
  const outcomes = await writeTransaction(async (trx) => {
    const audit: AuditEvent[] = [];
    const out: Outcome[] = [];
    for (const unit of units) {
      if (units.length > 1) await sql`savepoint unit`.execute(trx);
      try {
        const done = await unit(trx, dialect);
        if (units.length > 1) await sql`release savepoint unit`.execute(trx);
        audit.push(...done.audit);
        out.push({ ok: true, value: done.result });
      } catch (error) {
        // A lone unit's failure rolls back the whole (one-unit) transaction instead.
        if (units.length === 1) throw error;
        await sql`rollback to savepoint unit`.execute(trx);
        await sql`release savepoint unit`.execute(trx);
        out.push({ ok: false, error });
      }
    }
    await appendAudit(trx, audit);
    return out;
  });
  return { outcomes, refused: units.length > 1 && outcomes.some((o) => !o.ok) };
}

/** Decides, group after group, whether to start with savepoints (after a refusal) or optimistically. */
export class SavepointPolicy {
  #cautious = 0;
  startWithSavepoints(): boolean {
    if (this.#cautious > 0) {
      this.#cautious--;
      return true;
    }
    return false;
  }
  /** After a group: did a unit refuse? */
  record(refused: boolean): void {
    if (refused) this.#cautious = CAUTIOUS_GROUPS;
  }
}

interface Pending {
  readonly work: UnitOfWork<unknown>;
  resolve(value: unknown): void;
  reject(err: unknown): void;
}

/** Group commit in this thread, on the store's own connection (PostgreSQL, and SQLite without a writer thread). */
export class GroupCommitter {
  readonly #store: Store;
  readonly #policy = new SavepointPolicy();
  #queue: Pending[] = [];
  #flushing = false;

  constructor(store: Store) {
    this.#store = store;
  }

  /** Resolves with the unit's result once its transaction has committed. The unit may run more than once (see above). */
  run<T>(work: UnitOfWork<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.#queue.push({ work: work as UnitOfWork<unknown>, resolve: resolve as (v: unknown) => void, reject });
      if (!this.#flushing) {
        this.#flushing = true;
        setImmediate(() => void this.#flush());
      }
    });
  }

  /** Resolves once every unit handed over so far has settled. */
  async drain(): Promise<void> {
    while (this.#flushing || this.#queue.length > 0) await new Promise((resolve) => setTimeout(resolve, 1));
  }

  async #flush(): Promise<void> {
    while (this.#queue.length > 0) {
      const batch = this.#queue.splice(0, MAX_BATCH);
      let outcomes: Outcome[];
      try {
        const r = await commitGroup((fn) => this.#store.writeTransaction(fn), this.#store.dialect, batch.map((p) => p.work), this.#policy.startWithSavepoints());
        this.#policy.record(r.refused);
        outcomes = r.outcomes;
      } catch (err) {
        // The transaction as a whole failed (or its only unit did): nothing of it was kept.
        for (const p of batch) p.reject(err);
        continue;
      }
      batch.forEach((p, i) => {
        const o = outcomes[i]!;
        if (o.ok) p.resolve(o.value);
        else p.reject(o.error);
      });
    }
    this.#flushing = false;
  }
}
