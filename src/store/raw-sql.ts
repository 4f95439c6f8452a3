// Hand-written SQL for the enrolment hot path. Kysely's builder costs ~20-40 µs of event-loop time per
// statement to build and compile (measured: ~16 % of the EST enrolment main thread with ~15 statements
// per enrolment), while the SQL text of these statements never changes. Written once with `?`
// placeholders; PostgreSQL gets `$1, $2, …` (converted once per text and cached).

import { CompiledQuery, type Kysely, type Transaction } from 'kysely';
import type { Dialect } from './database.js';
import type { Database } from './schema.js';

const postgresText = new Map<string, string>();

function textFor(dialect: Dialect, text: string): string {
  if (dialect !== 'postgres') return text;
  let out = postgresText.get(text);
  if (out === undefined) {
    let n = 0;
    out = text.replace(/\?/g, () => `$${++n}`);
    postgresText.set(text, out);
  }
  return out;
}

/** Runs one statement; returns its rows (empty for writes) and the number of rows changed. */
export async function rawSql<R = Record<string, unknown>>(db: Kysely<Database> | Transaction<Database>, dialect: Dialect, text: string, parameters: readonly unknown[]): Promise<{ rows: R[]; changed: number }> {
  const result = await db.executeQuery<R>(CompiledQuery.raw(textFor(dialect, text), parameters as unknown[]));
  return { rows: result.rows, changed: Number(result.numAffectedRows ?? 0n) };
}
