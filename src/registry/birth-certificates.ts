// Birth certificates: a certificate over a chip's hardware key, signed by its silicon vendor (or
// the factory). Checked at registration against the vendor trust store (`hallmark vendor add`):
// it must chain to a trusted vendor CA, be valid at registration time, and carry the registered key.

import { createPublicKey } from 'node:crypto';
import type { Kysely, Transaction } from 'kysely';
import { appendAudit } from '../audit/audit-log.js';
import { verifyIssuedBy } from '../pki/verify.js';
import { HallmarkError } from '../errors.js';
import { parseCertificate, sha256Fingerprint, type ParsedCertificate } from '../pki/certificate.js';
import { EXT, decodeBasicConstraints } from '../pki/extensions.js';
import { nameToString } from '../pki/names.js';
import { SIZE_LIMITS, decodePemBlocks } from '../pki/pem.js';
import { nowIso, type Store } from '../store/database.js';
import type { Database } from '../store/schema.js';
import { Registry, checkName, type BirthCertificateCheck } from './registry.js';

const MAX_CHAIN_DEPTH = 6;

function invalid(reason: string): HallmarkError {
  return new HallmarkError('BIRTH_CERT_INVALID', `birth certificate ${reason}`);
}

function canonicalSpki(spki: Buffer): Buffer {
  return createPublicKey({ key: spki, format: 'der', type: 'spki' }).export({ type: 'spki', format: 'der' });
}

function isCa(cert: ParsedCertificate): boolean {
  const bc = cert.extensions.get(EXT.basicConstraints);
  return !!bc && decodeBasicConstraints(bc.value).ca;
}

interface Anchor { readonly vendor: string; readonly cert: ParsedCertificate }

// Trust anchors are read once per handle (an import checks many certificates through one), but never
// kept past a change of the trust store: addVendorCa in this process invalidates them at once, and a
// change made by another process is seen within ANCHOR_TTL_MS (a handle may live as long as a server).
const ANCHOR_TTL_MS = 1000;
let trustGeneration = 0;
const anchorCache = new WeakMap<object, { readonly generation: number; readonly readAt: number; readonly anchors: Promise<Anchor[]> }>();

async function anchors(trx: Transaction<Database> | Kysely<Database>): Promise<Anchor[]> {
  const hit = anchorCache.get(trx);
  if (hit && hit.generation === trustGeneration && Date.now() - hit.readAt < ANCHOR_TTL_MS) return hit.anchors;
  const entry = {
    generation: trustGeneration,
    readAt: Date.now(),
    anchors: trx.selectFrom('vendor_cas').innerJoin('vendors', 'vendors.id', 'vendor_cas.vendor_id').select(['vendors.name', 'vendor_cas.der']).execute()
      .then((rows) => rows.map((r) => ({ vendor: r.name, cert: parseCertificate(Buffer.from(r.der)) }))),
  };
  anchorCache.set(trx, entry);
  entry.anchors.catch(() => { if (anchorCache.get(trx) === entry) anchorCache.delete(trx); });
  return entry.anchors;
}

function signedBy(cert: ParsedCertificate, issuer: ParsedCertificate): boolean {
  try { verifyIssuedBy(cert, issuer); return true; } catch { return false; }
}

/** Verifies a birth certificate; returns the vendor whose CA it chains to. */
export async function verifyBirthCertificate(trx: Transaction<Database> | Kysely<Database>, certificate: Buffer, publicKeySpki: Buffer, at: Date, intermediates: readonly Buffer[] = []): Promise<string> {
  let leaf: ParsedCertificate;
  try { leaf = parseCertificate(certificate); } catch (err) { throw invalid(`cannot be parsed: ${(err as Error).message}`); }
  if (!canonicalSpki(leaf.subjectPublicKeyInfo).equals(canonicalSpki(publicKeySpki))) throw invalid('does not carry the registered public key');
  const chain: ParsedCertificate[] = [];
  for (const der of intermediates) {
    try { chain.push(parseCertificate(der)); } catch (err) { throw invalid(`chain certificate cannot be parsed: ${(err as Error).message}`); }
  }
  const trusted = await anchors(trx);
  if (trusted.length === 0) throw invalid('cannot be checked: no vendor CA is trusted (hallmark vendor add NAME --ca FILE)');
  let current = leaf;
  for (let depth = 0; depth <= MAX_CHAIN_DEPTH; depth++) {
    const what = depth === 0 ? '' : ` (chain certificate ${nameToString(current.subject)})`;
    if (at < current.notBefore || at > current.notAfter) throw invalid(`is not valid at ${at.toISOString()}${what}: valid ${current.notBefore.toISOString()} to ${current.notAfter.toISOString()}`);
    const anchor = trusted.find((a) => a.cert.subject.equals(current.issuer) && signedBy(current, a.cert));
    if (anchor) {
      if (at < anchor.cert.notBefore || at > anchor.cert.notAfter) throw invalid(`chains to vendor CA ${nameToString(anchor.cert.subject)}, which is not valid at ${at.toISOString()}`);
      return anchor.vendor;
    }
    const next = chain.find((c) => c.subject.equals(current.issuer) && c !== current && signedBy(current, c));
    if (!next) throw invalid(`does not chain to a trusted vendor CA (issuer ${nameToString(current.issuer)} is neither trusted nor in the given chain)`);
    if (!isCa(next)) throw invalid(`chain certificate ${nameToString(next.subject)} is not a CA`);
    current = next;
  }
  throw invalid('chain is too long');
}

export const checkBirthCertificate: BirthCertificateCheck = async (trx, certificate, publicKeySpki, at, intermediates) => {
  await verifyBirthCertificate(trx, certificate, publicKeySpki, at, intermediates);
};

/** A registry that checks birth certificates against the vendor trust store. */
export function registryFor(store: Store): Registry {
  return new Registry(store, checkBirthCertificate);
}

/** Adds the CA certificate(s) in `pem` to vendor `name` (created when new). Returns how many were new. */
export async function addVendorCa(store: Store, options: { vendor: string; pem: string; actor: string }): Promise<number> {
  const vendor = checkName('vendor', options.vendor);
  const blocks = decodePemBlocks(options.pem, SIZE_LIMITS.chain).filter((b) => b.label === 'CERTIFICATE');
  if (blocks.length === 0) throw new HallmarkError('BAD_PEM', 'no CERTIFICATE block in the vendor CA file');
  const certs = blocks.map((b) => parseCertificate(b.der));
  for (const c of certs) if (!isCa(c)) throw new HallmarkError('BAD_REQUEST', `${nameToString(c.subject)} is not a CA certificate (basicConstraints CA:TRUE)`);
  const added = await store.writeTransaction(async (trx) => {
    let row = await trx.selectFrom('vendors').select('id').where('name', '=', vendor).executeTakeFirst();
    if (!row) {
      await trx.insertInto('vendors').values({ name: vendor, created_at: nowIso() }).execute();
      row = await trx.selectFrom('vendors').select('id').where('name', '=', vendor).executeTakeFirstOrThrow();
    }
    let added = 0;
    for (const c of certs) {
      const fp = sha256Fingerprint(c.der);
      if (await trx.selectFrom('vendor_cas').select('id').where('fingerprint_sha256', '=', fp).executeTakeFirst()) continue;
      await trx.insertInto('vendor_cas').values({ vendor_id: row.id, subject: nameToString(c.subject), fingerprint_sha256: fp, der: c.der, not_after: nowIso(c.notAfter), created_at: nowIso() }).execute();
      await appendAudit(trx, [{ actor: options.actor, action: 'vendor.ca_add', target: vendor, details: { subject: nameToString(c.subject), fingerprintSha256: fp, notAfter: nowIso(c.notAfter) } }]);
      added++;
    }
    return added;
  });
  if (added > 0) trustGeneration++;
  return added;
}

export async function listVendorCas(db: Kysely<Database>): Promise<{ vendor: string; subject: string; fingerprintSha256: string; notAfter: string }[]> {
  const rows = await db.selectFrom('vendor_cas').innerJoin('vendors', 'vendors.id', 'vendor_cas.vendor_id').select(['vendors.name', 'vendor_cas.subject', 'vendor_cas.fingerprint_sha256', 'vendor_cas.not_after']).orderBy('vendors.name').execute();
  return rows.map((r) => ({ vendor: r.name, subject: r.subject, fingerprintSha256: r.fingerprint_sha256, notAfter: r.not_after }));
}
