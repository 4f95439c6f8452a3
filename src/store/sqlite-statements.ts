// Prepared-statement reuse for better-sqlite3 under Kysely. Kysely's SQLite driver calls
// db.prepare(sql) for every query it runs, and preparing (parsing and planning) costs SQLite more than
// running most of our statements (measured: ~15 % of the enrolment path's main-thread time). The SQL
// text of a query is fixed while its parameters vary, so a statement prepared once per text is reused.
// Bounded: a flood of distinct texts (bulk inserts of varying sizes) only resets the cache.
// Safe because nothing iterates a statement (no streaming queries) while another run of it starts.

import type BetterSqlite3 from 'better-sqlite3';

const MAX_STATEMENTS = 512;

export function reusingStatements(db: BetterSqlite3.Database): BetterSqlite3.Database {
  const cache = new Map<string, BetterSqlite3.Statement>();
  const prepare = (source: string): BetterSqlite3.Statement => {
    let stmt = cache.get(source);
    if (!stmt) {
      stmt = db.prepare(source);
      if (cache.size >= MAX_STATEMENTS) cache.clear();
      cache.set(source, stmt);
    }
    return stmt;
  };
  return new Proxy(db, {
    get(target, property) {
      if (property === 'prepare') return prepare;
      const value = Reflect.get(target, property, target) as unknown;
      return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
    },
  });
}
