// The online side of the root ceremonies: recording a root rollover (the new root and the link
// certificates the offline root made) and installing a root CRL (revoked intermediates). Neither needs a
// root key: everything installed here is public and is checked against what the store already trusts.
//
//   hallmark root install-rollover --from DIR   the new root becomes an active root CA row ("root-N"),
//                                               the two link certificates become certificates rows of
//                                               profile 'root' (NewWithOld issued by the old root, OldWithNew
//                                               by the new one); copies go to <home>/rollover/.
//   hallmark root install-crl --crl FILE        the CRL goes to <home>/crl/<root>.crl (and .crl.pem) and the
//                                               crls table; each intermediate it lists becomes 'revoked',
//                                               with everything it issued (cACompromise), and the devices
//                                               that held those certificates are marked for re-enrolment
//                                               (audit action device.reenrolment-required; their state is kept).

import { mkdir, readdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { appendAudit, type AuditEvent } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { keyAlgorithmOf, publicKeyFromSpki } from '../pki/algorithms.js';
import { normaliseSerialHex, parseCertificate, sha256Fingerprint, type ParsedCertificate } from '../pki/certificate.js';
import { EXT, decodeBasicConstraints, decodeKeyUsage, keyIdentifier } from '../pki/extensions.js';
import { nameToString } from '../pki/names.js';
import { SIZE_LIMITS, decodeOne, encodePem } from '../pki/pem.js';
import { verifyIssuedBy } from '../pki/verify.js';
import { parseCrl, verifyCrlSignature, type ParsedCrl } from '../protocols/crl/crl.js';
import { nowIso, type Store } from '../store/database.js';
import type { CaRow } from '../store/schema.js';
import type { Authority } from './authority.js';
import { ROOT_ROLLOVER_FILES, rootGenerationName } from './offline-root.js';
import type { RevocationReason } from './revocation.js';

export const ROLLOVER_HOME_DIR = 'rollover';
export const CRL_HOME_DIR = 'crl';

/** Where install-crl keeps root generation `name`'s CRL in the home (DER; PEM in the same path + `.pem`). */
export const rootCrlPath = (home: string, name: string): string => join(home, CRL_HOME_DIR, `${name}.crl`);

export interface InstalledRollover {
  readonly name: string;
  readonly previous: string;
  readonly subject: string;
  readonly serial: string;
  readonly notAfter: string;
  readonly alreadyInstalled: boolean;
  readonly files: readonly string[];
}

function checkCaCertificate(cert: ParsedCertificate, what: string): void {
  const bcExt = cert.extensions.get(EXT.basicConstraints);
  if (!bcExt || !decodeBasicConstraints(bcExt.value).ca) throw new HallmarkError('CA_CERT_MISMATCH', `${what} is not a CA certificate`);
  const kuExt = cert.extensions.get(EXT.keyUsage);
  if (!kuExt || !decodeKeyUsage(kuExt.value).includes('keyCertSign')) throw new HallmarkError('CA_CERT_MISMATCH', `${what} does not allow certificate signing`);
  if (cert.notAfter <= new Date()) throw new HallmarkError('CA_CERT_MISMATCH', `${what} has expired`);
}

async function readCertificate(dir: string, file: string): Promise<ParsedCertificate> {
  let text: Buffer;
  try { text = await readFile(join(dir, file)); } catch { throw new HallmarkError('BAD_REQUEST', `${dir} has no ${file}`); }
  return parseCertificate(decodeOne(text, ['CERTIFICATE'], SIZE_LIMITS.certificate));
}

const serialOf = (cert: ParsedCertificate): string => cert.serialHex.replace(/^00(?=.)/, '');

/** The newest generation N > 1 for which `dir` holds root-N.pem and both link certificates. */
async function latestGeneration(dir: string): Promise<number> {
  let names: string[];
  try { names = await readdir(dir); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${dir}`); }
  const gens = names.map((n) => /^root-(\d{1,4})-newwithold\.pem$/.exec(n)).filter((m): m is RegExpExecArray => !!m).map((m) => Number(m[1]))
    .filter((g) => g > 1 && names.includes(ROOT_ROLLOVER_FILES.certificate(g)) && names.includes(ROOT_ROLLOVER_FILES.oldWithNew(g)));
  if (gens.length === 0) throw new HallmarkError('BAD_REQUEST', `${dir} holds no rollover (root-N.pem, root-N-newwithold.pem, root-N-oldwithnew.pem): run hallmark root rollover first`);
  return Math.max(...gens);
}

/**
 * Records a root rollover made by `hallmark root rollover`: reads root-N.pem, root-N-newwithold.pem and
 * root-N-oldwithnew.pem from `from` (the root directory or a copy of those public files), checks that
 * NewWithNew is self-signed, that NewWithOld is the new key signed by an active root of this store and
 * that OldWithNew is that root's key signed by the new key, then inserts the new root ("root-N", active:
 * from now on the current root) and the two link certificates, audited (ca.rollover). Idempotent.
 */
export async function installRootRollover(options: { store: Store; home: string; from: string; generation?: number; actor: string }): Promise<InstalledRollover> {
  const { store } = options;
  const generation = options.generation ?? (await latestGeneration(options.from));
  const name = rootGenerationName(generation);
  const files = [ROOT_ROLLOVER_FILES.certificate(generation), ROOT_ROLLOVER_FILES.newWithOld(generation), ROOT_ROLLOVER_FILES.oldWithNew(generation)] as const;
  const [newRoot, newWithOld, oldWithNew] = await Promise.all(files.map((f) => readCertificate(options.from, f))) as [ParsedCertificate, ParsedCertificate, ParsedCertificate];

  verifyIssuedBy(newRoot, newRoot);
  checkCaCertificate(newRoot, `the new root ${files[0]}`);
  if (!newWithOld.subject.equals(newRoot.subject) || !newWithOld.subjectPublicKeyInfo.equals(newRoot.subjectPublicKeyInfo)) throw new HallmarkError('CA_CERT_MISMATCH', `${files[1]} does not certify the new root's key under its name`);
  const roots = await store.db.selectFrom('certificate_authorities').selectAll().where('role', '=', 'root').orderBy('id').execute();
  let oldRow: CaRow | undefined;
  let oldRoot: ParsedCertificate | undefined;
  for (const row of roots) {
    if (row.status !== 'active' || !row.certificate_der) continue;
    const cert = parseCertificate(Buffer.from(row.certificate_der));
    if (!cert.subject.equals(newWithOld.issuer) || cert.subject.equals(newRoot.subject)) continue;
    try { verifyIssuedBy(newWithOld, cert); } catch { continue; }
    oldRow = row;
    oldRoot = cert;
  }
  if (!oldRow || !oldRoot) throw new HallmarkError('CA_CERT_MISMATCH', `${files[1]} is not signed by an active root of this authority`);
  checkCaCertificate(newWithOld, files[1]);
  if (!oldWithNew.subject.equals(oldRoot.subject) || !oldWithNew.subjectPublicKeyInfo.equals(oldRoot.subjectPublicKeyInfo)) throw new HallmarkError('CA_CERT_MISMATCH', `${files[2]} does not certify the key of ${oldRow.name} under its name`);
  verifyIssuedBy(oldWithNew, newRoot);
  checkCaCertificate(oldWithNew, files[2]);

  const existing = roots.find((r) => r.name === name);
  let alreadyInstalled = false;
  if (existing) {
    if (!existing.certificate_der || !Buffer.from(existing.certificate_der).equals(newRoot.der)) throw new HallmarkError('CA_EXISTS', `a CA named ${name} already exists with another certificate`);
    alreadyInstalled = true;
  } else {
    const ski = keyIdentifier(newRoot.subjectPublicKeyInfo).toString('hex');
    const clash = await store.db.selectFrom('certificate_authorities').select('name').where((eb) => eb.or([eb('name', '=', name), eb('ski', '=', ski)])).executeTakeFirst();
    if (clash) throw new HallmarkError('CA_EXISTS', `CA ${clash.name} already has this name or key`);
    const now = nowIso();
    const subject = nameToString(newRoot.subject);
    await store.writeTransaction(async (trx) => {
      await trx.insertInto('certificate_authorities').values({
        name, role: 'root', parent_id: null, status: 'active', subject, key_ref: null,
        key_algorithm: keyAlgorithmOf(publicKeyFromSpki(newRoot.subjectPublicKeyInfo)), ski, path_len: null,
        certificate_der: newRoot.der, csr_der: null, serial: serialOf(newRoot), not_before: nowIso(newRoot.notBefore), not_after: nowIso(newRoot.notAfter),
        created_at: now, updated_at: now,
      }).execute();
      const inserted = await trx.selectFrom('certificate_authorities').select('id').where('name', '=', name).executeTakeFirstOrThrow();
      const link = (cert: ParsedCertificate, issuerId: number) => ({
        issuer_id: issuerId, serial: serialOf(cert), profile: 'root', subject: nameToString(cert.subject), fingerprint_sha256: sha256Fingerprint(cert.der),
        not_before: nowIso(cert.notBefore), not_after: nowIso(cert.notAfter), der: cert.der, status: 'valid' as const, revoked_at: null, revocation_reason: null,
        requested_by: options.actor, created_at: now,
      });
      await trx.insertInto('certificates').values([link(newWithOld, oldRow!.id), link(oldWithNew, Number(inserted.id))]).execute();
      await appendAudit(trx, [{
        actor: options.actor, action: 'ca.rollover', target: name, details: {
          previous: oldRow!.name, subject, serial: serialOf(newRoot), fingerprintSha256: sha256Fingerprint(newRoot.der), notAfter: nowIso(newRoot.notAfter),
          newWithOld: { serial: serialOf(newWithOld), fingerprintSha256: sha256Fingerprint(newWithOld.der) },
          oldWithNew: { serial: serialOf(oldWithNew), fingerprintSha256: sha256Fingerprint(oldWithNew.der) },
        },
      }]);
    });
  }
  // Copies for operators and relying parties (the store is the record).
  const dir = join(options.home, ROLLOVER_HOME_DIR);
  await mkdir(dir, { recursive: true });
  const written: string[] = [];
  for (const [file, cert] of [[files[0], newRoot], [files[1], newWithOld], [files[2], oldWithNew]] as const) {
    await writeFile(join(dir, file), encodePem('CERTIFICATE', cert.der));
    written.push(join(dir, file));
  }
  return { name, previous: oldRow.name, subject: nameToString(newRoot.subject), serial: serialOf(newRoot), notAfter: nowIso(newRoot.notAfter), alreadyInstalled, files: written };
}

export interface RevokedIntermediate {
  readonly name: string;
  readonly serial: string;
  /** The reason on the root CRL. */
  readonly reason: string;
  /** Whether this run changed the CA's status (false: it was already revoked). */
  readonly newlyRevoked: boolean;
  /** Certificates it issued that this run revoked. */
  readonly certificatesRevoked: number;
  /** Devices that held one of those certificates: marked for re-enrolment. */
  readonly devices: readonly string[];
  /** Production lines still pointing to this CA: give them a new CA before their devices re-enrol. */
  readonly lines: readonly string[];
}

export interface InstalledRootCrl {
  readonly root: string;
  readonly number: number;
  readonly thisUpdate: Date;
  readonly nextUpdate?: Date;
  readonly entries: number;
  readonly path: string;
  readonly revoked: readonly RevokedIntermediate[];
  /** CRL entries naming no intermediate of this store (signed by the root but never installed here). */
  readonly unknownSerials: readonly string[];
}

/** The reason the certificates of a revoked CA get: cACompromise unless the CA was retired for a non-compromise reason. */
function childReason(caReason: string): RevocationReason {
  return (['superseded', 'cessationOfOperation', 'affiliationChanged', 'privilegeWithdrawn'] as const).find((r) => r === caReason) ?? 'cACompromise';
}

/**
 * Installs a root CRL made by `hallmark root revoke` / `root crl`: checks its signature against an
 * active root of the store (and that it is not older than one already installed), keeps it in
 * <home>/crl/<root>.crl (DER) and <root>.crl.pem and the crls table, and for every intermediate it lists: status
 * 'revoked' (its own certificates row too), then everything it issued revoked through
 * authority.revoke({ ca }, cACompromise), and the devices concerned marked for re-enrolment (an audit
 * entry device.reenrolment-required each; the device keeps its state). Subordinate CAs of a revoked CA
 * go with it. Safe to run again (a re-run finishes what an interrupted one left).
 */
export async function installRootCrl(authority: Authority, options: { crl: string | Buffer; actor: string; now?: Date }): Promise<InstalledRootCrl> {
  const now = options.now ?? new Date();
  const der = decodeOne(options.crl, ['X509 CRL'], SIZE_LIMITS.crl);
  const crl: ParsedCrl = parseCrl(der);
  if (crl.deltaBase !== undefined) throw new HallmarkError('BAD_REQUEST', 'this is a delta CRL: install the full root CRL');
  if (crl.number === undefined) throw new HallmarkError('BAD_REQUEST', 'the CRL has no CRL number');
  const store = authority.store;
  const roots = await store.db.selectFrom('certificate_authorities').selectAll().where('role', '=', 'root').orderBy('id').execute();
  const root = roots.find((r) => r.certificate_der && parseCertificate(Buffer.from(r.certificate_der)).subject.equals(crl.issuer) && verifyCrlSignature(crl, parseCertificate(Buffer.from(r.certificate_der)).subjectPublicKeyInfo));
  if (!root) throw new HallmarkError('CA_CERT_MISMATCH', 'the CRL is not signed by a root CA of this authority');
  if (crl.nextUpdate && crl.nextUpdate <= now) throw new HallmarkError('BAD_REQUEST', `the CRL expired at ${crl.nextUpdate.toISOString()}: make a fresh one (hallmark root crl)`);
  const latest = await store.db.selectFrom('crls').select(['number', 'der']).where('ca_id', '=', root.id).orderBy('number', 'desc').executeTakeFirst();
  const sameAsLatest = !!latest && Number(latest.number) === crl.number && Buffer.from(latest.der).equals(der);
  if (latest && Number(latest.number) > crl.number) throw new HallmarkError('BAD_REQUEST', `CRL number ${crl.number} is older than the root CRL already installed (number ${latest.number})`);
  if (latest && Number(latest.number) === crl.number && !sameAsLatest) throw new HallmarkError('BAD_REQUEST', `another root CRL with number ${crl.number} is already installed`);

  // Which CAs the CRL names: the intermediates this root signed (their certificates rows carry the serial).
  const issuedByRoot = await store.db.selectFrom('certificate_authorities').selectAll().where('role', '=', 'intermediate').where('parent_id', '=', root.id).execute();
  const byCa = new Map<number, { row: CaRow; serial: string; reason: string; revokedAt: Date }>();
  const unknownSerials: string[] = [];
  for (const e of crl.entries) {
    const serial = normaliseSerialHex(e.serialHex);
    const row = issuedByRoot.find((r) => r.serial !== null && normaliseSerialHex(r.serial) === serial);
    if (row) byCa.set(row.id, { row, serial, reason: e.reason, revokedAt: e.revokedAt });
    else unknownSerials.push(serial);
  }
  // Subordinate CAs (signed online by a revoked intermediate) go with their parent.
  const all = await store.db.selectFrom('certificate_authorities').selectAll().where('role', '=', 'intermediate').execute();
  const queue = [...byCa.values()];
  while (queue.length) {
    const parent = queue.shift()!;
    for (const child of all.filter((r) => r.parent_id === parent.row.id && !byCa.has(r.id))) {
      const entry = { row: child, serial: child.serial ?? '', reason: parent.reason, revokedAt: parent.revokedAt };
      byCa.set(child.id, entry);
      queue.push(entry);
    }
  }

  const when = nowIso(now);
  const newly = new Set<number>();
  await store.writeTransaction(async (trx) => {
    const events: AuditEvent[] = [];
    if (!sameAsLatest) {
      await trx.insertInto('crls').values({
        ca_id: root.id, number: crl.number!, kind: 'full', base_number: null, this_update: nowIso(crl.thisUpdate),
        next_update: nowIso(crl.nextUpdate ?? crl.thisUpdate), entries: crl.entries.length, der, created_at: when,
      }).execute();
    }
    events.push({ actor: options.actor, action: 'crl.install', target: root.name, details: { number: crl.number, thisUpdate: nowIso(crl.thisUpdate), nextUpdate: crl.nextUpdate ? nowIso(crl.nextUpdate) : null, entries: crl.entries.length, fingerprintSha256: sha256Fingerprint(der) } });
    for (const { row, serial, reason, revokedAt } of byCa.values()) {
      if (row.status !== 'revoked') {
        await trx.updateTable('certificate_authorities').set({ status: 'revoked', updated_at: when }).where('id', '=', row.id).execute();
        newly.add(row.id);
        events.push({ actor: options.actor, action: 'ca.revoke', target: row.name, details: { serial, reason, revokedAt: nowIso(revokedAt), by: row.parent_id === root.id ? `root CRL ${root.name} #${crl.number}` : 'parent CA revoked' } });
      }
      // Its own certificate (recorded by ca install / ca create under its issuer).
      if (serial && row.parent_id !== null) {
        await trx.updateTable('certificates').set({ status: 'revoked', revoked_at: nowIso(revokedAt), revocation_reason: reason === 'unspecified' ? null : reason })
          .where('issuer_id', '=', row.parent_id).where('serial', '=', serial).where('status', '=', 'valid').execute();
      }
    }
    await appendAudit(trx, events, now);
  });
  if (!sameAsLatest || newly.size > 0) {
    await mkdir(join(authority.home, CRL_HOME_DIR), { recursive: true });
    const path = rootCrlPath(authority.home, root.name);
    await writeAtomic(path, der);
    await writeAtomic(`${path}.pem`, Buffer.from(encodePem('X509 CRL', der)));
  }

  const revoked: RevokedIntermediate[] = [];
  for (const { row, serial, reason } of byCa.values()) {
    // The devices whose valid certificates this CA issued: they re-enrol (their next enrolment goes to their line's CA).
    const devices = (await store.db.selectFrom('certificates').select('device_udid').distinct().where('issuer_id', '=', row.id).where('status', '=', 'valid').where('device_udid', 'is not', null).execute())
      .map((d) => d.device_udid!).sort();
    const result = await authority.revoke({ ca: row.name }, childReason(reason), options.actor);
    if (devices.length) {
      await authority.audit(devices.map((udid) => ({ actor: options.actor, action: 'device.reenrolment-required', target: udid, details: { ca: row.name, reason: childReason(reason), cause: 'issuing CA revoked by the root' } })));
    }
    const lines = (await store.db.selectFrom('lines').select('name').where('ca_id', '=', row.id).orderBy('name').execute()).map((l) => l.name);
    revoked.push({ name: row.name, serial, reason, newlyRevoked: newly.has(row.id), certificatesRevoked: result.revoked, devices, lines });
  }
  return { root: root.name, number: crl.number, thisUpdate: crl.thisUpdate, nextUpdate: crl.nextUpdate, entries: crl.entries.length, path: rootCrlPath(authority.home, root.name), revoked, unknownSerials };
}

async function writeAtomic(path: string, data: Buffer): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, data);
  await rename(tmp, path);
}
