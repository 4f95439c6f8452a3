// Group commit for issued certificates. Records that arrive while a commit is in flight are
// written together in the next transaction (one fsync for many certificates); each caller's
// promise resolves only after the transaction holding its record has committed, so nothing is
// returned before it is durable.

import { CompiledQuery } from 'kysely';
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
/** Rows per INSERT statement (with ~14 parameters each: well under SQLite's 32766 and PostgreSQL's 65535). */
const ROWS_PER_INSERT = 128;

// Multi-row INSERT text by dialect, column list and row count, built once and reused. The Kysely
// builder parsed and compiled one value node per column per row on every batch (~4-5 µs per
// certificate on the event loop, plus garbage); only the parameters change between batches.
const insertSql = new Map<string, string>();

function certificateInsert(dialect: Store['dialect'], columns: readonly string[], rows: number): string {
  const key = `${dialect}:${rows}:${columns.join(',')}`;
  let text = insertSql.get(key);
  if (!text) {
    let n = 0;
    const placeholder = dialect === 'postgres' ? (): string => `$${++n}` : (): string => '?';
    const tuples = Array.from({ length: rows }, () => `(${columns.map(placeholder).join(', ')})`);
    text = `insert into "certificates" (${columns.map((c) => `"${c}"`).join(', ')}) values ${tuples.join(', ')}`;
    if (insertSql.size < 1024) insertSql.set(key, text);
  }
  return text;
}

/** The columns the rows set (as Kysely would: undefined means "not given"), or null when the rows differ in shape. */
function sharedColumns(rows: readonly NewCertificateRow[]): string[] | null {
  const defined = (row: NewCertificateRow): string[] => Object.keys(row).filter((k) => (row as Record<string, unknown>)[k] !== undefined);
  const columns = defined(rows[0]!);
  if (!columns.every((c) => /^[a-z_][a-z0-9_]*$/.test(c))) return null;
  const shape = columns.join(',');
  return rows.every((r) => defined(r).join(',') === shape) ? columns : null;
}

/** The row values in column order, or null if one is not a plain value (an SQL expression, say). */
function plainParameters(rows: readonly NewCertificateRow[], columns: readonly string[]): unknown[] | null {
  const out: unknown[] = [];
  for (const row of rows) {
    for (const c of columns) {
      const v = (row as Record<string, unknown>)[c];
      if (typeof v === 'object' && v !== null && !(v instanceof Uint8Array) && !(v instanceof Date)) return null;
      out.push(v);
    }
  }
  return out;
}

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
    const dialect = this.#store.dialect;
    await this.#store.writeTransaction(async (trx) => {
      for (let i = 0; i < batch.length; i += ROWS_PER_INSERT) {
        const rows = batch.slice(i, i + ROWS_PER_INSERT).map((p) => p.row);
        const columns = sharedColumns(rows);
        const parameters = columns ? plainParameters(rows, columns) : null;
        if (!columns || !parameters) {
          await trx.insertInto('certificates').values(rows).execute(); // mixed shapes or SQL expressions: Kysely's way
          continue;
        }
        await trx.executeQuery(CompiledQuery.raw(certificateInsert(dialect, columns, rows.length), parameters));
      }
      await appendAudit(trx, batch.map((p) => p.audit));
    });
  }
}
