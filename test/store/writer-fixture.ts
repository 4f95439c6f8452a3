// Procedures for the store writer tests (sqlite-writer.test.ts). A module of its own: the writer thread
// imports the module that defines a procedure, and a test file must not be imported there.

import { HallmarkError } from '../../src/errors.js';
import { nowIso } from '../../src/store/database.js';
import { asBuffer, defineProcedure } from '../../src/store/procedures.js';
import { rawSql } from '../../src/store/raw-sql.js';

/** Inserts a tenant; refuses (after its insert) when asked to. */
export const ADD_TENANT = defineProcedure(import.meta.url, 'addTenant', async (trx, dialect, a: { name: string; refuse?: boolean }) => {
  await rawSql(trx, dialect, 'insert into tenants (name, created_at) values (?, ?)', [a.name, nowIso()]);
  if (a.refuse) throw Object.assign(new HallmarkError('QUOTA_EXCEEDED', `${a.name} refused`), { retryAfterSeconds: 7 });
  return { result: a.name, audit: [{ actor: 'test', action: 'tenant.add', target: a.name }] };
});

/** Inserts a row whose foreign key is only checked at COMMIT (the table has a deferred constraint): the commit fails. */
export const DANGLING = defineProcedure(import.meta.url, 'dangling', async (trx, dialect, a: { id: number }) => {
  await rawSql(trx, dialect, 'insert into writer_child (id, parent_id) values (?, ?)', [a.id, 1_000_000 + a.id]);
  return { result: a.id, audit: [] };
});

/** Inserts a child row (a valid one unless told otherwise). */
export const CHILD = defineProcedure(import.meta.url, 'child', async (trx, dialect, a: { id: number }) => {
  await rawSql(trx, dialect, 'insert into writer_child (id, parent_id) values (?, ?)', [a.id, 1]);
  return { result: a.id, audit: [{ actor: 'test', action: 'child.add', target: String(a.id) }] };
});

/** Round trip of bytes: the argument crossed a thread boundary (a Uint8Array there), stored as a blob. */
export const BYTES = defineProcedure(import.meta.url, 'bytes', async (trx, dialect, a: { name: string; bytes: Uint8Array }) => {
  const b = asBuffer(a.bytes);
  await rawSql(trx, dialect, 'insert into tenants (name, created_at) values (?, ?)', [a.name, b.toString('hex')]);
  return { result: { isBuffer: Buffer.isBuffer(b), length: b.length }, audit: [] };
});

/** Ends the thread it runs in, as a crash would (only ever sent to the writer thread). */
export const CRASH = defineProcedure(import.meta.url, 'crash', async () => {
  process.exit(3);
});

/** Waits (blocking its thread) for `ms`: holds the writer busy so that other units queue up behind it. */
export const SLOW = defineProcedure(import.meta.url, 'slow', async (trx, dialect, a: { name: string; ms: number }) => {
  const until = Date.now() + a.ms;
  while (Date.now() < until) { /* busy */ }
  await rawSql(trx, dialect, 'insert into tenants (name, created_at) values (?, ?)', [a.name, nowIso()]);
  return { result: a.name, audit: [] };
});
