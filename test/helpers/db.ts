// Store targets for tests: every store-backed test runs once on SQLite (a temp file) and once on
// PostgreSQL (a fresh database per test, dropped afterwards).
//
// PostgreSQL is found at HALLMARK_TEST_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/test
// (an admin connection; each test gets its own database hallmark_t_<random hex> next to it).
// When it cannot be reached, the PostgreSQL variant is skipped locally and FAILS in CI (CI=true):
// a green CI run must have exercised both dialects.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import pg from 'pg';
import { Store, redactUrl } from '../../src/store/database.js';
import { makeTempDir } from './tmp.js';

export const STORE_TARGETS = ['sqlite', 'postgres'] as const;
export type StoreDialect = (typeof STORE_TARGETS)[number];

export const POSTGRES_ADMIN_URL = process.env.HALLMARK_TEST_POSTGRES_URL || 'postgres://postgres@127.0.0.1:5432/test';

export interface StoreTarget {
  readonly dialect: StoreDialect;
  /** For Store.open or HALLMARK_DATABASE_URL: a fresh SQLite file path or a fresh PostgreSQL database URL. */
  readonly url: string;
  /** A scratch directory that lives as long as the target (the SQLite file is in it). */
  readonly dir: string;
  /** Opens a Store on the target. Stores still open at cleanup are closed then. */
  openStore(): Promise<Store>;
  /** Closes stores, drops the PostgreSQL database, removes the scratch directory. Idempotent. */
  cleanup(): Promise<void>;
}

/** PostgreSQL did not answer at POSTGRES_ADMIN_URL (as opposed to answering with an error). */
export class PostgresUnreachable extends Error {
  override readonly name = 'PostgresUnreachable';
}

let unreachableReason: string | undefined;

function describeError(err: unknown): string {
  const e = err as { message?: string; code?: string; errors?: unknown[] };
  if (e?.message) return e.message;
  if (e?.errors?.length) return e.errors.map(describeError).join('; '); // AggregateError (::1 and 127.0.0.1)
  return e?.code ?? String(err);
}

async function withAdminClient<T>(fn: (client: pg.Client) => Promise<T>): Promise<T> {
  if (unreachableReason) throw new PostgresUnreachable(unreachableReason);
  const client = new pg.Client({ connectionString: POSTGRES_ADMIN_URL, connectionTimeoutMillis: 3000 });
  client.on('error', () => { /* reported through the awaited calls */ });
  try {
    await client.connect();
  } catch (err) {
    await client.end().catch(() => {});
    unreachableReason = `PostgreSQL unreachable at ${redactUrl(POSTGRES_ADMIN_URL)}: ${describeError(err)}`;
    throw new PostgresUnreachable(unreachableReason, { cause: err });
  }
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => {});
  }
}

/** Creates a fresh target. Throws PostgresUnreachable when PostgreSQL does not answer. */
export async function createStoreTarget(dialect: StoreDialect): Promise<StoreTarget> {
  const scratch = await makeTempDir(`hallmark-${dialect}-`);
  const stores = new Set<Store>();
  let url: string;
  let dropDatabase: (() => Promise<void>) | undefined;
  if (dialect === 'sqlite') {
    url = join(scratch.path, 'hallmark-test.db');
  } else {
    const name = `hallmark_t_${randomBytes(6).toString('hex')}`;
    try {
      await withAdminClient((c) => c.query(`CREATE DATABASE "${name}"`));
    } catch (err) {
      await scratch.cleanup();
      throw err;
    }
    const u = new URL(POSTGRES_ADMIN_URL);
    u.pathname = `/${name}`;
    url = u.toString();
    dropDatabase = () => withAdminClient((c) => c.query(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`)).then(() => undefined);
  }
  let cleaned = false;
  return {
    dialect,
    url,
    dir: scratch.path,
    async openStore() {
      const store = await Store.open({ url });
      stores.add(store);
      return store;
    },
    async cleanup() {
      if (cleaned) return;
      cleaned = true;
      for (const s of stores) await s.close().catch(() => { /* already closed by its owner */ });
      if (dropDatabase) await dropDatabase();
      await scratch.cleanup();
    },
  };
}

/**
 * A target for `dialect`, or undefined after marking `t` skipped (PostgreSQL unreachable, not in CI).
 * In CI an unreachable PostgreSQL fails the test. The caller must call cleanup().
 */
export async function storeTargetOrSkip(t: TestContext, dialect: StoreDialect): Promise<StoreTarget | undefined> {
  try {
    return await createStoreTarget(dialect);
  } catch (err) {
    if (!(err instanceof PostgresUnreachable)) throw err;
    if (process.env.CI === 'true') {
      assert.fail(`${err.message}. CI must run the PostgreSQL variant: start PostgreSQL there or point HALLMARK_TEST_POSTGRES_URL at one.`);
    }
    t.skip(err.message);
    return undefined;
  }
}

/**
 * Registers one test per dialect, "<name> [sqlite]" and "<name> [postgres]". `body` runs with a fresh
 * target (await subtests with t.test inside it); the target is cleaned up afterwards.
 */
export function forEachDialect(
  name: string,
  body: (t: TestContext, target: StoreTarget) => Promise<void>,
  options: { readonly dialects?: readonly StoreDialect[]; readonly timeout?: number } = {},
): void {
  for (const dialect of options.dialects ?? STORE_TARGETS) {
    test(`${name} [${dialect}]`, { timeout: options.timeout ?? 120_000 }, async (t) => {
      const target = await storeTargetOrSkip(t, dialect);
      if (!target) return;
      try {
        await body(t, target);
      } finally {
        await target.cleanup();
      }
    });
  }
}

/** Runs `fn` with HALLMARK_DATABASE_URL set to `url` (for code that opens the store itself, like init). */
export async function withDatabaseUrl<T>(url: string, fn: () => Promise<T>): Promise<T> {
  const previous = process.env.HALLMARK_DATABASE_URL;
  process.env.HALLMARK_DATABASE_URL = url;
  try {
    return await fn();
  } finally {
    if (previous === undefined) delete process.env.HALLMARK_DATABASE_URL;
    else process.env.HALLMARK_DATABASE_URL = previous;
  }
}
