// Group commit for issued certificates. Records that arrive while a commit is in flight are
// written together in the next transaction (one fsync for many certificates); each caller's
// promise resolves only after the transaction holding its record has committed, so nothing is
// returned before it is durable.

import { appendAudit, type AuditEvent } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import type { Store } from './database.js';
import type { NewCertificateRow } from './schema.js';

interface Pending {
  readonly row: NewCertificateRow;
  readonly audit: AuditEvent;
  resolve(): void;
  reject(err: unknown): void;
}

const MAX_BATCH = 256;

function isUniqueViolation(err: unknown): boolean {
  const e = err as { code?: string; message?: string };
  return e?.code === '23505' || e?.code === 'SQLITE_CONSTRAINT_UNIQUE' || /UNIQUE constraint failed/.test(e?.message ?? '');
}

export class CertificateRecorder {
  readonly #store: Store;
  #queue: Pending[] = [];
  #flushing = false;

  constructor(store: Store) {
    this.#store = store;
  }

  /** Resolves once the certificate and its audit entry are committed. A duplicate serial rejects with SERIAL_COLLISION. */
  record(row: NewCertificateRow, audit: AuditEvent): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.#queue.push({ row, audit, resolve, reject });
      if (!this.#flushing) {
        this.#flushing = true;
        setImmediate(() => void this.#flush());
      }
    });
  }

  async #flush(): Promise<void> {
    while (this.#queue.length > 0) {
      const batch = this.#queue.splice(0, MAX_BATCH);
      try {
        await this.#write(batch);
        for (const p of batch) p.resolve();
      } catch (err) {
        if (batch.length > 1 && isUniqueViolation(err)) {
          // One record collided: write them one by one so only that one fails.
          for (const p of batch) {
            try { await this.#write([p]); p.resolve(); } catch (e) { p.reject(this.#translate(e)); }
          }
        } else {
          for (const p of batch) p.reject(this.#translate(err));
        }
      }
    }
    this.#flushing = false;
  }

  #translate(err: unknown): unknown {
    if (isUniqueViolation(err)) return new HallmarkError('SERIAL_COLLISION', 'serial number already used by this issuer', { cause: err });
    return err;
  }

  async #write(batch: readonly Pending[]): Promise<void> {
    await this.#store.writeTransaction(async (trx) => {
      for (let i = 0; i < batch.length; i += 100) {
        await trx.insertInto('certificates').values(batch.slice(i, i + 100).map((p) => p.row)).execute();
      }
      await appendAudit(trx, batch.map((p) => p.audit));
    });
  }
}
