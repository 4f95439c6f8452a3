// Group commit for units of work that each decide something in the store (a device issuance: take
// quota, spend a claim, record the certificate). Work that arrives while a commit is in flight runs in
// the next transaction, each unit inside its own SAVEPOINT, so one unit's refusal (quota used up, claim
// spent) rolls back only that unit; the audit entries of the units that succeeded are appended once at
// the end, and everything commits with one fsync. Each caller's promise settles only after the
// transaction holding its work has committed (or failed), so nothing is returned before it is durable.
//
// Why: one enrolment is a few microseconds of SQL but a whole fsync (and on PostgreSQL a round trip per
// statement plus a commit); committing them together is what lets enrolment approach the signing rate.

import { sql, type Transaction } from 'kysely';
import { appendAudit, type AuditEvent } from '../audit/audit-log.js';
import type { Dialect, Store } from './database.js';
import type { Database } from './schema.js';

export type UnitOfWork<T> = (trx: Transaction<Database>, dialect: Dialect) => Promise<{ result: T; audit: readonly AuditEvent[] }>;

interface Pending {
  readonly work: UnitOfWork<unknown>;
  resolve(value: unknown): void;
  reject(err: unknown): void;
}

/** Units per transaction: bounds how long one commit holds the write lock. */
const MAX_BATCH = 128;

export class GroupCommitter {
  readonly #store: Store;
  #queue: Pending[] = [];
  #flushing = false;

  constructor(store: Store) {
    this.#store = store;
  }

  run<T>(work: UnitOfWork<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.#queue.push({ work: work as UnitOfWork<unknown>, resolve: resolve as (v: unknown) => void, reject });
      if (!this.#flushing) {
        this.#flushing = true;
        setImmediate(() => void this.#flush());
      }
    });
  }

  async #flush(): Promise<void> {
    while (this.#queue.length > 0) {
      const batch = this.#queue.splice(0, MAX_BATCH);
      const outcomes: ({ ok: true; value: unknown } | { ok: false; error: unknown })[] = [];
      try {
        await this.#store.writeTransaction(async (trx) => {
          const audit: AuditEvent[] = [];
          for (const p of batch) {
            if (batch.length > 1) await sql`savepoint unit`.execute(trx);
            try {
              const done = await p.work(trx, this.#store.dialect);
              if (batch.length > 1) await sql`release savepoint unit`.execute(trx);
              audit.push(...done.audit);
              outcomes.push({ ok: true, value: done.result });
            } catch (error) {
              // A lone unit's failure rolls back the whole (one-unit) transaction instead.
              if (batch.length === 1) throw error;
              await sql`rollback to savepoint unit`.execute(trx);
              await sql`release savepoint unit`.execute(trx);
              outcomes.push({ ok: false, error });
            }
          }
          await appendAudit(trx, audit);
        });
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
