// Transaction procedures: named units of work that run inside a write transaction and return their
// result and the audit entries to append. A procedure is known by the module that defines it and its
// name, so it can run in another thread — the SQLite writer (sqlite-writer.ts) imports the module and
// looks the name up — with only its arguments crossing over. Arguments are structured-cloned on the way
// there: a Buffer arrives as a plain Uint8Array (asBuffer turns it back), class instances as plain
// objects, functions not at all. A procedure may run more than once for one commit (group commit reruns
// a group with savepoints when one of its units refused), so it must only touch the transaction.

import type { Transaction } from 'kysely';
import type { AuditEvent } from '../audit/audit-log.js';
import type { Dialect } from './database.js';
import type { Database } from './schema.js';

export interface ProcedureOutcome<R> {
  readonly result: R;
  /** Appended to the audit log in the same transaction, only if the unit commits. */
  readonly audit: readonly AuditEvent[];
}

export type ProcedureBody<A, R> = (trx: Transaction<Database>, dialect: Dialect, args: A) => Promise<ProcedureOutcome<R>>;

export interface Procedure<A, R> {
  /** URL of the defining module (its import.meta.url). */
  readonly module: string;
  readonly name: string;
  readonly run: ProcedureBody<A, R>;
}

/** A procedure and its arguments, as data (what travels to the writer thread). */
export interface ProcedureCall {
  readonly module: string;
  readonly name: string;
  readonly args: unknown;
}

const defined = new Map<string, Procedure<unknown, unknown>>();
const keyOf = (module: string, name: string): string => `${module}#${name}`;

/** Defines a procedure; call at module top level with the module's import.meta.url. */
export function defineProcedure<A, R>(module: string, name: string, run: ProcedureBody<A, R>): Procedure<A, R> {
  const key = keyOf(module, name);
  if (defined.has(key)) throw new Error(`procedure ${name} is defined twice in ${module}`);
  const procedure: Procedure<A, R> = Object.freeze({ module, name, run });
  defined.set(key, procedure as Procedure<unknown, unknown>);
  return procedure;
}

export function callOf<A>(procedure: Procedure<A, unknown>, args: A): ProcedureCall {
  return { module: procedure.module, name: procedure.name, args };
}

/** The procedure named by a call, importing its module first if this thread has not loaded it yet. */
export async function loadProcedure(module: string, name: string): Promise<Procedure<unknown, unknown>> {
  let p = defined.get(keyOf(module, name));
  if (!p) {
    await import(module);
    p = defined.get(keyOf(module, name));
    if (!p) throw new Error(`module ${module} defines no procedure ${name}`);
  }
  return p;
}

/** Runs calls in order inside the caller's transaction; their audit entries, concatenated. */
export async function runCalls(trx: Transaction<Database>, dialect: Dialect, calls: readonly ProcedureCall[] | undefined): Promise<AuditEvent[]> {
  const audit: AuditEvent[] = [];
  for (const c of calls ?? []) audit.push(...(await (await loadProcedure(c.module, c.name)).run(trx, dialect, c.args)).audit);
  return audit;
}

/** A Buffer over the same bytes (arguments that crossed a thread boundary arrive as Uint8Array). */
export function asBuffer(bytes: Uint8Array): Buffer;
export function asBuffer(bytes: Uint8Array | null): Buffer | null;
export function asBuffer(bytes: Uint8Array | null): Buffer | null {
  if (bytes === null || Buffer.isBuffer(bytes)) return bytes as Buffer | null;
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}
