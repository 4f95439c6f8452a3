// The body of a SQLite write transaction once BEGIN has run on `conn`: the serving thread's
// writeTransaction (database.ts) and the writer thread's (sqlite-writer-worker.ts) differ only in how
// they take the lock.

import { sql, type Kysely, type Transaction } from 'kysely';
import type { Database } from './schema.js';

/** Runs `fn` on a connection already in BEGIN, then COMMIT; ROLLBACK (and rethrow) when it fails. */
export async function commitOrRollback<T>(conn: Kysely<Database>, fn: (trx: Transaction<Database>) => Promise<T>): Promise<T> {
  try {
    // A Kysely Transaction is a Kysely bound to one connection; the connection here is already in BEGIN.
    const result = await fn(conn as unknown as Transaction<Database>);
    await sql`commit`.execute(conn);
    return result;
  } catch (err) {
    await sql`rollback`.execute(conn).catch(() => {});
    throw err;
  }
}
