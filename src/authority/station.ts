// Offline factory stations, online side ("Company A": a factory without network that is not fully
// trusted). The authority prepares a station, installs its sub-CA certificate after the root ceremony,
// and imports the journal the station brings back. The offline side (src/station/) signs device CSRs
// with the sub-CA key in the factory's PKCS#11 token and keeps a hash-chained, signed journal.
//
//   createStation   a batch with the station's quota and expiry; the sub-CA key generated in the token
//                   (it never leaves it); PACKAGE/station.json, station.csr (signed through the token) and
//                   chain.pem; a pending CA row with key_ref NULL (the online server can never sign with
//                   it) and a `stations` row; prints the `hallmark root sign` command for the ceremony.
//   installStation  the root-signed certificate: pathLen 0, a critical name constraint permitting only
//                   the batch's device DN, notAfter no later than validUntil; the CA becomes active (key
//                   still offline) and PACKAGE/station.pem is written.
//   importJournal   verifyJournal (src/station/journal.ts), then in ONE transaction: devices registered
//                   (or matched to the batch's registered devices by key), certificates recorded under
//                   the station CA, the batch quota counted, each step audited. Duplicates, gaps, edited,
//                   forged or unsigned entries, over-quota entries, certificates not signed by the
//                   station key and journals of another station are reported, never imported.
//
// Revocation: a station CA's key is in the factory token, so no CRL or OCSP answer can be signed for it
// online (the CRL publisher and OCSP responder skip such CAs). `hallmark revoke --device` marks the
// certificates revoked in the store and the device `revoked` in the registry, and the connection checker
// (and the broker integration through it) refuses the device from the registry.

import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { createPublicKey, randomBytes } from 'node:crypto';
import { appendAudit, type AuditEvent } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import type { KeyBackend } from '../keys/key-backend.js';
import { parseKeyAlgorithm, signingSchemeFor, type KeyAlgorithm } from '../pki/algorithms.js';
import { encodeCrl } from '../protocols/crl/crl.js';
import { parseCertificate, serialToHex, sha256Fingerprint, type ParsedCertificate } from '../pki/certificate.js';
import { TAG, children, readWhole } from '../pki/der.js';
import { EXT, decodeBasicConstraints, decodeKeyUsage, keyIdentifier } from '../pki/extensions.js';
import { encodeName, encodeNameString, nameToString } from '../pki/names.js';
import { SIZE_LIMITS, decodeOne, encodePem } from '../pki/pem.js';
import { isP256Point, isP256Spki } from '../pki/p256.js';
import { verifyIssuedBy } from '../pki/verify.js';
import { DEFAULT_TENANT, normaliseUdid, udidOfKey } from '../registry/registry.js';
import { nowIso } from '../store/database.js';
import type { Transaction } from 'kysely';
import type { Database, StationRow } from '../store/schema.js';
import { csrFromSigner, type Authority } from './authority.js';
import { describeKeyRef } from './ca-directory.js';
import { defaultRootDir } from './home.js';
import { PROFILES } from './profiles.js';
/** The station CRL outlives validUntil by a day, so a device certificate ending at validUntil is never checked against an expired CRL. */
const STATION_CRL_GRACE_MS = 86_400_000;
import { JOURNAL_FORMAT, JOURNAL_LIMITS, verifyJournal, type JournalProblem, type VerifiedIssue } from '../station/journal.js';
import { PACKAGE_FILES, STATION_PACKAGE_FORMAT, checkStationPackage, deviceSubject, encodeSubjectBase, parseStationManifest, serializeManifest, type StationManifest } from '../station/package.js';

/** The files of a station package directory (station.json, station.pem and chain.pem as src/station/package.ts reads them). */
export const STATION_PACKAGE_FILES = {
  description: PACKAGE_FILES.manifest,
  /** The sub-CA's CSR, signed through the token, for the root ceremony. */
  request: 'station.csr',
  certificate: PACKAGE_FILES.certificate,
  chain: PACKAGE_FILES.chain,
} as const;

/** A device registered in the station's batch at creation (its key known in advance). */
export interface StationDeviceRegistration {
  readonly publicKeySpki: Buffer;
  readonly udid?: string;
  readonly serialNumber?: string;
}

export interface CreateStationOptions {
  readonly line: string;
  /** Product of the batch; may be left out when the authority has exactly one product. */
  readonly product?: string;
  readonly quota: number;
  readonly validUntil: Date;
  /** pkcs11:token=LABEL[;object=LABEL] — where the sub-CA key is generated. */
  readonly keyUri: string;
  readonly pin: string;
  /** PKCS#11 module; default HALLMARK_PKCS11_MODULE, then the authority's own PKCS#11 module. */
  readonly module?: string;
  readonly algorithm?: KeyAlgorithm | string;
  /** Registered devices: the package then lists them and the station signs only their keys. */
  readonly devices?: readonly StationDeviceRegistration[];
  /** The package directory (created; must not exist or be empty). */
  readonly outDir: string;
  /** For the printed ceremony command; default the root directory beside the home. */
  readonly rootDir?: string;
  readonly actor: string;
}

export interface CreatedStation {
  readonly id: string;
  /** Name of the station's CA (pending until installStation). */
  readonly ca: string;
  readonly line: string;
  readonly product: string;
  readonly batch: string;
  readonly quota: number;
  readonly validUntil: string;
  readonly keyUri: string;
  readonly deviceSubjectBase: string;
  readonly packageDir: string;
  readonly csrPem: string;
  /** `hallmark root sign …` for the ceremony, as argv and as one shell-quoted line. */
  readonly rootSignArgs: readonly string[];
  readonly rootSignCommand: string;
}

export interface StationInfo {
  readonly id: string;
  readonly ca: string;
  readonly status: 'pending' | 'active' | 'expired' | 'revoked';
  readonly line: string;
  readonly product: string;
  readonly batch: string;
  readonly quota: number;
  /** Devices of the batch that received their first identity (station imports and online enrolments). */
  readonly issued: number;
  readonly imported: number;
  readonly refused: number;
  readonly lastSeq: number;
  readonly lastImportAt: string | null;
  readonly validUntil: string;
  readonly keyUri: string;
  readonly deviceSubjectBase: string;
  readonly registeredOnly: boolean;
  readonly createdAt: string;
  readonly installedAt: string | null;
}

const DAY_MS = 86_400_000;

// ---------------------------------------------------------------- create

export async function createStation(authority: Authority, options: CreateStationOptions): Promise<CreatedStation> {
  const quota = options.quota;
  if (!Number.isInteger(quota) || quota < 1 || quota > 100_000_000) throw new HallmarkError('BAD_REQUEST', 'the station quota must be a whole number from 1 to 100,000,000');
  if (!(options.validUntil instanceof Date) || Number.isNaN(options.validUntil.getTime())) throw new HallmarkError('BAD_REQUEST', 'validUntil is not a date');
  // Whole seconds: the sub-CA certificate's notAfter is exactly this instant.
  const validUntil = new Date(Math.floor(options.validUntil.getTime() / 1000) * 1000);
  if (validUntil.getTime() <= Date.now() + 60_000) throw new HallmarkError('BAD_REQUEST', `the station's validity must end in the future (${validUntil.toISOString()})`);
  const rootName = await authority.rootName();
  const [rootDer] = await authority.caChain(rootName, false);
  const root = parseCertificate(rootDer!);
  if (validUntil > root.notAfter) throw new HallmarkError('BAD_REQUEST', `the station cannot outlive the root ${rootName} (valid until ${root.notAfter.toISOString()})`);
  if (validUntil.getTime() - Date.now() > PROFILES.intermediate.maxValidityDays * DAY_MS - 600_000) throw new HallmarkError('BAD_REQUEST', `a station is valid for at most ${PROFILES.intermediate.maxValidityDays} days`);
  const uri = parseStationKeyUri(options.keyUri);
  const algorithm = parseKeyAlgorithm(options.algorithm ?? 'ecdsa-p256');
  const module = options.module || process.env.HALLMARK_PKCS11_MODULE || (authority.config.keyBackend.kind === 'pkcs11' ? authority.config.keyBackend.module : undefined);
  if (!module) throw new HallmarkError('BAD_REQUEST', 'which PKCS#11 module drives the station token? give --module PATH (or HALLMARK_PKCS11_MODULE)');
  const db = authority.store.db;

  const line = await db.selectFrom('lines').select(['id', 'name']).where('name', '=', options.line).executeTakeFirst();
  if (!line) throw new HallmarkError('LINE_NOT_FOUND', `no line named ${options.line}`);
  const product = await chooseProduct(authority, options.product);
  const devices = prepareDevices(options.devices ?? []);
  await refuseClones(authority, devices);
  const packageDir = resolve(options.outDir);
  const packageDirExists = await checkEmptyDir(packageDir);

  const hex = randomBytes(6).toString('hex');
  const id = `station-${hex}`;
  const batchId = `b-${randomBytes(6).toString('hex')}`;
  const org = authority.config.org;
  const subjectBase = nameToString(encodeName([{ type: 'O', value: org }, { type: 'OU', value: product.name }, { type: 'OU', value: `batch ${batchId}` }]));
  // The CN ends with the CA's name, as `hallmark ca request` writes it: `hallmark root revoke --ca ID` finds it.
  const caSubject = encodeName([{ type: 'CN', value: `${org} ${id}` }, { type: 'O', value: org }]);

  // The token first: a wrong PIN, a missing token or a failed key generation stores nothing.
  const { Pkcs11KeyBackend } = await import('../keys/pkcs11-backend.js');
  const token: KeyBackend = await Pkcs11KeyBackend.open({ module, token: uri.token, pin: options.pin });
  let keyRef;
  let csrDer: Buffer;
  let spki: Buffer;
  let crlDer: Buffer;
  let crlTimes: { thisUpdate: Date; nextUpdate: Date };
  try {
    keyRef = await token.generateKey(uri.object ?? `hallmark-${id}`, algorithm);
    const signer = await token.signer(keyRef);
    spki = signer.publicKeySpki;
    csrDer = await csrFromSigner(caSubject, signer);
    // The station CA's only CRL, signed now while the token is at HQ: empty, valid until the station's end
    // (its device certificates end no later). Relying parties that check CRLs (Mosquitto, OpenSSL's
    // crl_check) refuse a certificate whose issuer has no CRL; revocations of station devices are then
    // enforced through the registry (connection checker, broker), since no later CRL can be signed online.
    const thisUpdate = new Date(Math.floor(Date.now() / 1000) * 1000);
    crlDer = await encodeCrl({
      issuer: caSubject, issuerKeyId: keyIdentifier(spki), scheme: signingSchemeFor(algorithm), thisUpdate,
      nextUpdate: new Date(validUntil.getTime() + STATION_CRL_GRACE_MS), number: 1, entries: [],
    }, (tbs) => signer.sign(tbs));
    crlTimes = { thisUpdate, nextUpdate: new Date(validUntil.getTime() + STATION_CRL_GRACE_MS) };
  } finally {
    await token.close();
  }

  const now = nowIso();
  const description: StationManifest = {
    format: STATION_PACKAGE_FORMAT,
    version: 1,
    stationId: id,
    line: line.name,
    product: product.name,
    batch: batchId,
    org,
    quota,
    validUntil: validUntil.toISOString(),
    deviceSubjectBase: subjectBase,
    deviceValidityDays: product.validity_days,
    devices: devices.length ? devices.map((d) => ({ udid: d.udid, serialNumber: d.serialNumber, publicKeySha256: d.keyHash })) : null,
    keyUri: keyRef.id,
    createdAt: now,
  };
  const csrPem = encodePem('CERTIFICATE REQUEST', csrDer);
  const written: string[] = [];
  const put = async (file: string, data: string): Promise<void> => {
    const path = join(packageDir, file);
    await writeFile(`${path}.tmp`, data, { mode: 0o644 });
    await rename(`${path}.tmp`, path);
    written.push(path);
  };
  if (!packageDirExists) await mkdir(packageDir, { recursive: true, mode: 0o755 });
  try {
    // The files are written before the commit and removed if it fails: a package never exists without its station.
    // serializeManifest checks it as the station will (src/station/package.ts).
    await put(STATION_PACKAGE_FILES.description, serializeManifest(description));
    await put(STATION_PACKAGE_FILES.request, csrPem);
    await put(STATION_PACKAGE_FILES.chain, encodePem('CERTIFICATE', rootDer!));
    await authority.store.writeTransaction(async (trx) => {
      const audit: AuditEvent[] = [];
      await trx.insertInto('batches').values({
        id: batchId, product_id: product.id, line_id: line.id, quota, allow_unregistered: 0, require_approval: 0, expires_at: description.validUntil, created_at: now,
      }).execute();
      audit.push({ actor: options.actor, action: 'batch.create', target: batchId, details: { product: product.name, line: line.name, quota, expiresAt: description.validUntil, allowUnregistered: false, requireApproval: false, station: id } });
      const ca = await trx.insertInto('certificate_authorities').values({
        name: id, role: 'intermediate', parent_id: null, status: 'pending', subject: nameToString(caSubject), key_ref: null,
        key_algorithm: algorithm, ski: keyIdentifier(spki).toString('hex'), path_len: null, certificate_der: null, csr_der: csrDer,
        serial: null, not_before: null, not_after: null, created_at: now, updated_at: now,
      }).returning('id').executeTakeFirstOrThrow();
      await trx.insertInto('crls').values({
        ca_id: Number(ca.id), number: 1, kind: 'full', base_number: null, this_update: nowIso(crlTimes.thisUpdate), next_update: nowIso(crlTimes.nextUpdate), entries: 0, der: crlDer, created_at: now,
      }).execute();
      audit.push({ actor: options.actor, action: 'crl.issue', target: id, details: { ca: id, number: 1, kind: 'full', entries: 0, nextUpdate: nowIso(crlTimes.nextUpdate), signedBy: 'station token, at station create' } });
      audit.push({ actor: options.actor, action: 'ca.request', target: id, details: { subject: nameToString(caSubject), keyAlgorithm: algorithm, keyLocation: `${describeKeyRef(JSON.stringify(keyRef))} (factory station token, offline)`, station: id } });
      if (devices.length) await ensureTenant(trx, DEFAULT_TENANT, now);
      for (const d of devices) {
        const holder = await trx.selectFrom('devices').select(['udid', 'batch_id']).where((eb) => eb.or([eb('udid', '=', d.udid), eb('public_key_sha256', '=', d.keyHash)])).executeTakeFirst();
        if (holder) throw new HallmarkError('CLONE_DETECTED', `device ${d.udid}: its UDID or key is already registered to device ${holder.udid} (batch ${holder.batch_id})`);
        await trx.insertInto('devices').values({
          udid: d.udid, public_key_spki: d.spki, public_key_sha256: d.keyHash, serial_number: d.serialNumber, product_id: product.id, line_id: line.id, batch_id: batchId,
          tenant: DEFAULT_TENANT, birth_cert_der: null, state: 'registered', created_at: now, updated_at: now, provisioned_at: null,
        }).execute();
        audit.push({ actor: options.actor, action: 'device.register', target: d.udid, details: { batch: batchId, tenant: DEFAULT_TENANT, source: 'station.create', station: id } });
      }
      await trx.insertInto('stations').values({
        id, ca_id: Number(ca.id), line_id: line.id, batch_id: batchId, status: 'pending', quota, valid_until: description.validUntil, key_uri: keyRef.id,
        subject_base: subjectBase, device_validity_days: product.validity_days, registered_only: devices.length ? 1 : 0, last_import_at: null,
        created_by: options.actor, created_at: now, installed_at: null,
      }).execute();
      audit.push({ actor: options.actor, action: 'station.create', target: id, details: { line: line.name, product: product.name, batch: batchId, quota, validUntil: description.validUntil, keyUri: keyRef.id, deviceSubjectBase: subjectBase, registeredDevices: devices.length } });
      await appendAudit(trx, audit);
    });
  } catch (err) {
    for (const path of written) await rm(path, { force: true }).catch(() => {});
    if (!packageDirExists) await rm(packageDir, { recursive: true, force: true }).catch(() => {});
    throw err;
  }
  const rootDir = options.rootDir ?? defaultRootDir(authority.home);
  const rootSignArgs = [
    'hallmark', 'root', 'sign', '--root-dir', rootDir, '--csr', join(packageDir, STATION_PACKAGE_FILES.request), '--path-len', '0',
    '--permit-dn', subjectBase, '--not-after', description.validUntil, '--station-manifest', join(packageDir, STATION_PACKAGE_FILES.description),
    '--out', join(packageDir, STATION_PACKAGE_FILES.certificate),
  ];
  return {
    id, ca: id, line: line.name, product: product.name, batch: batchId, quota, validUntil: description.validUntil, keyUri: keyRef.id,
    deviceSubjectBase: subjectBase, packageDir, csrPem, rootSignArgs, rootSignCommand: rootSignArgs.map(shellQuote).join(' '),
  };
}

async function ensureTenant(trx: Transaction<Database>, tenant: string, now: string): Promise<void> {
  if (!(await trx.selectFrom('tenants').select('name').where('name', '=', tenant).executeTakeFirst())) await trx.insertInto('tenants').values({ name: tenant, created_at: now }).execute();
}

function parseStationKeyUri(text: string): { token: string; object?: string } {
  if (typeof text !== 'string' || !/^pkcs11:/i.test(text)) throw new HallmarkError('BAD_REQUEST', `the station key is named by a PKCS#11 URI (pkcs11:token=LABEL;object=LABEL), not ${JSON.stringify(text)}`);
  // Parsed here, without loading the PKCS#11 module (same rules as the backend: RFC 7512).
  const attributes = new Map<string, string>();
  for (const segment of text.slice('pkcs11:'.length).split(/[?#]/, 1)[0]!.split(';').filter(Boolean)) {
    const eq = segment.indexOf('=');
    if (eq <= 0) throw new HallmarkError('BAD_REQUEST', `malformed PKCS#11 URI: attribute ${JSON.stringify(segment)} is not name=value`);
    let value: string;
    try { value = decodeURIComponent(segment.slice(eq + 1)); } catch { throw new HallmarkError('BAD_REQUEST', `malformed PKCS#11 URI: bad percent-encoding in ${segment.slice(0, eq)}`); }
    attributes.set(segment.slice(0, eq).toLowerCase(), value);
  }
  const token = attributes.get('token');
  if (!token) throw new HallmarkError('BAD_REQUEST', 'the station key URI must name the token (pkcs11:token=LABEL)');
  if (attributes.has('id')) throw new HallmarkError('BAD_REQUEST', 'the station key is generated in the token: name the token (and optionally the object label), not an id');
  const type = attributes.get('type');
  if (type !== undefined && type !== 'private') throw new HallmarkError('BAD_REQUEST', `the station key URI names a ${type} object, not a private key`);
  const object = attributes.get('object');
  return object ? { token, object } : { token };
}

async function chooseProduct(authority: Authority, name: string | undefined): Promise<{ id: number; name: string; validity_days: number }> {
  const q = authority.store.db.selectFrom('products').select(['id', 'name', 'validity_days', 'profile']);
  const rows = name === undefined ? await q.execute() : await q.where('name', '=', name).execute();
  if (name !== undefined && rows.length === 0) throw new HallmarkError('PRODUCT_NOT_FOUND', `no product named ${name}`);
  if (rows.length === 0) throw new HallmarkError('PRODUCT_NOT_FOUND', 'no product exists yet (hallmark product create NAME)');
  if (rows.length > 1) throw new HallmarkError('BAD_REQUEST', `name the product of the station's batch (--product): one of ${rows.map((r) => r.name).join(', ')}`);
  const p = rows[0]!;
  if (p.profile !== 'device') throw new HallmarkError('PROFILE_VIOLATION', `product ${p.name} uses profile ${p.profile}: a station signs device certificates only`);
  return { id: Number(p.id), name: p.name, validity_days: Number(p.validity_days) };
}

interface PreparedDevice { readonly udid: string; readonly spki: Buffer; readonly keyHash: string; readonly serialNumber: string | null }

function prepareDevices(list: readonly StationDeviceRegistration[]): PreparedDevice[] {
  const seen = new Set<string>();
  return list.map((d, i) => {
    const what = `device ${i + 1}`;
    if (!Buffer.isBuffer(d.publicKeySpki)) throw new HallmarkError('BAD_REQUEST', `${what}: no public key`);
    let spki: Buffer;
    try {
      spki = canonicalSpki(d.publicKeySpki);
    } catch (err) {
      throw new HallmarkError('BAD_REQUEST', `${what}: not a public key (SubjectPublicKeyInfo DER): ${(err as Error).message}`);
    }
    const keyHash = udidOfKey(spki);
    const udid = d.udid === undefined ? keyHash : normaliseUdid(d.udid);
    const serialNumber = d.serialNumber ?? null;
    if (serialNumber !== null && !/^[A-Za-z0-9 '()+,\-./:=?]{1,64}$/.test(serialNumber)) throw new HallmarkError('BAD_REQUEST', `${what}: a serial number is 1-64 printable characters`);
    for (const k of [`u:${udid}`, `k:${keyHash}`]) {
      if (seen.has(k)) throw new HallmarkError('BAD_REQUEST', `${what}: its UDID or key appears twice in the list`);
      seen.add(k);
    }
    return { udid, spki, keyHash, serialNumber };
  });
}

/**
 * The SPKI as the registry hashes it (Registry.deviceByPublicKey): a P-256 key in its one DER form is taken
 * as it is (once its point is checked); anything else is re-encoded by Node, and refused if Node cannot read it.
 */
function canonicalSpki(der: Buffer): Buffer {
  if (isP256Spki(der)) {
    if (!isP256Point(der.subarray(27, 59), der.subarray(59, 91))) throw new HallmarkError('UNSUPPORTED_ALGORITHM', 'the P-256 public key is not a point on the curve');
    return der;
  }
  return createPublicKey({ key: der, format: 'der', type: 'spki' }).export({ type: 'spki', format: 'der' });
}

async function refuseClones(authority: Authority, devices: readonly PreparedDevice[]): Promise<void> {
  for (let i = 0; i < devices.length; i += 500) {
    const chunk = devices.slice(i, i + 500);
    const holder = await authority.store.db.selectFrom('devices').select(['udid', 'batch_id'])
      .where((eb) => eb.or([eb('udid', 'in', chunk.map((d) => d.udid)), eb('public_key_sha256', 'in', chunk.map((d) => d.keyHash))])).executeTakeFirst();
    if (holder) throw new HallmarkError('CLONE_DETECTED', `a listed device's UDID or key is already registered to device ${holder.udid} (batch ${holder.batch_id})`);
  }
}

/** Whether `dir` exists (it must then be an empty directory: a package gets a directory of its own). */
async function checkEmptyDir(dir: string): Promise<boolean> {
  if (!existsSync(dir)) return false;
  let entries: string[];
  try { entries = await readdir(dir); } catch { throw new HallmarkError('BAD_REQUEST', `${dir} is not a directory`); }
  if (entries.length) throw new HallmarkError('BAD_REQUEST', `${dir} is not empty: a station package gets a directory of its own`);
  return true;
}

/** POSIX shell quoting for a printed command line. */
function shellQuote(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

// ---------------------------------------------------------------- package

/** Reads and checks PACKAGE/station.json (as the station reads it: src/station/package.ts). */
export async function readStationManifest(packageDir: string): Promise<StationManifest> {
  const path = join(packageDir, STATION_PACKAGE_FILES.description);
  let bytes: Buffer;
  try { bytes = await readFile(path); } catch { throw new HallmarkError('STATION_PACKAGE_INVALID', `${packageDir} is not a station package (no ${STATION_PACKAGE_FILES.description})`); }
  return parseStationManifest(bytes);
}

// ---------------------------------------------------------------- install

export interface InstalledStation {
  readonly id: string;
  readonly ca: string;
  readonly line: string;
  readonly batch: string;
  readonly subject: string;
  readonly serial: string;
  readonly notAfter: string;
  readonly root: string;
  readonly alreadyInstalled: boolean;
  readonly certificatePath: string;
}

/**
 * Installs the root-signed certificate of a pending station (from `certificate`, or PACKAGE/station.pem).
 * The package must be the one station create wrote for this station and the certificate must certify that
 * station's key, be signed by an active root, have pathLen 0, a critical name constraint permitting exactly
 * the batch's device DN, and end no later than the station's validUntil.
 */
export async function installStation(authority: Authority, options: { packageDir: string; certificate?: string | Buffer; actor: string }): Promise<InstalledStation> {
  const packageDir = resolve(options.packageDir);
  const pkg = await readStationManifest(packageDir);
  const station = await stationRow(authority, pkg.stationId, `this package's station ${pkg.stationId} is not known to this authority (made by another authority?)`);
  const info = await stationInfo(authority, station);
  comparePackage(pkg, info, authority.config.org);
  const certificatePath = join(packageDir, STATION_PACKAGE_FILES.certificate);
  let input = options.certificate;
  if (input === undefined) {
    try { input = await readFile(certificatePath); } catch { throw new HallmarkError('BAD_REQUEST', `${certificatePath} does not exist: give the certificate the root ceremony signed (--cert FILE)`); }
  }
  const der = decodeOne(input, ['CERTIFICATE'], SIZE_LIMITS.certificate);
  const cert = parseCertificate(der);
  const caRow = await authority.directory.caRow(info.ca);
  const ski = keyIdentifier(cert.subjectPublicKeyInfo).toString('hex');
  if (ski !== caRow.ski) {
    const other = await authority.store.db.selectFrom('stations').innerJoin('certificate_authorities as ca', 'ca.id', 'stations.ca_id').innerJoin('lines', 'lines.id', 'stations.line_id')
      .select(['stations.id', 'lines.name as line']).where('ca.ski', '=', ski).executeTakeFirst();
    throw new HallmarkError('STATION_MISMATCH', other
      ? `the certificate is for station ${other.id} (line ${other.line}), not for station ${info.id} (line ${info.line})`
      : `the certificate does not certify the key of station ${info.id} (it is not the certificate signed for ${STATION_PACKAGE_FILES.request} of this package)`);
  }
  if (caRow.status === 'active' && caRow.certificate_der && Buffer.from(caRow.certificate_der).equals(der) && station.status === 'active') {
    await writePackageCertificate(authority, packageDir, der);
    return { id: info.id, ca: info.ca, line: info.line, batch: info.batch, subject: caRow.subject, serial: caRow.serial ?? '', notAfter: caRow.not_after ?? '', root: await authority.directory.issuingRootOf(cert), alreadyInstalled: true, certificatePath };
  }
  if (caRow.status !== 'pending' && !(caRow.status === 'active' && caRow.certificate_der && Buffer.from(caRow.certificate_der).equals(der))) {
    throw new HallmarkError('CA_NOT_ACTIVE', `the CA of station ${info.id} is ${caRow.status}: it cannot be installed again`);
  }
  const rootName = await authority.directory.issuingRootOf(cert);
  const rootRow = await authority.directory.caRow(rootName);
  verifyIssuedBy(cert, parseCertificate(Buffer.from(rootRow.certificate_der!)));
  checkStationCertificate(cert, info, caRow.subject);
  // And the package as a whole, exactly as the station will check it at init (src/station/package.ts).
  const chain = await authority.caChain(rootName, true);
  const roots = (await authority.directory.activeRoots()).map((r) => Buffer.from(r.certificate_der!));
  checkStationPackage({ manifest: pkg, certificate: encodePem('CERTIFICATE', der), chain: chain.map((c) => encodePem('CERTIFICATE', c)).join('') }, { trustedRoots: roots, requireBoundManifest: true });
  const serial = serialToHex(Buffer.from(cert.serialHex, 'hex'));
  const subjectText = nameToString(cert.subject);
  const fingerprint = sha256Fingerprint(der);
  const now = nowIso();
  await authority.store.writeTransaction(async (trx) => {
    // Re-read inside the lock: two installs at once make one.
    const current = await trx.selectFrom('stations').select('status').where('id', '=', info.id).executeTakeFirstOrThrow();
    if (current.status !== 'pending') throw new HallmarkError('CA_NOT_ACTIVE', `station ${info.id} was installed meanwhile`);
    await trx.updateTable('certificate_authorities').set({
      status: 'active', parent_id: rootRow.id, certificate_der: der, serial, subject: subjectText, not_before: nowIso(cert.notBefore), not_after: nowIso(cert.notAfter),
      path_len: 0, updated_at: now,
    }).where('id', '=', caRow.id).execute();
    const recorded = await trx.selectFrom('certificates').select('id').where('issuer_id', '=', rootRow.id).where('serial', '=', serial).executeTakeFirst();
    if (!recorded) {
      await trx.insertInto('certificates').values({
        issuer_id: rootRow.id, serial, profile: 'intermediate', subject: subjectText, fingerprint_sha256: fingerprint, not_before: nowIso(cert.notBefore), not_after: nowIso(cert.notAfter),
        der, status: 'valid', revoked_at: null, revocation_reason: null, requested_by: options.actor, created_at: now,
      }).execute();
    }
    await trx.updateTable('stations').set({ status: 'active', installed_at: now }).where('id', '=', info.id).execute();
    await appendAudit(trx, [
      { actor: options.actor, action: 'ca.install', target: info.ca, details: { subject: subjectText, serial, fingerprintSha256: fingerprint, notAfter: nowIso(cert.notAfter), default: false, station: info.id, keyLocation: 'factory station token (offline)' } },
      { actor: options.actor, action: 'station.install', target: info.id, details: { ca: info.ca, line: info.line, batch: info.batch, root: rootName, serial, fingerprintSha256: fingerprint, notAfter: nowIso(cert.notAfter), permittedSubtree: info.deviceSubjectBase } },
    ]);
  });
  await writePackageCertificate(authority, packageDir, der);
  return { id: info.id, ca: info.ca, line: info.line, batch: info.batch, subject: subjectText, serial, notAfter: nowIso(cert.notAfter), root: rootName, alreadyInstalled: false, certificatePath };
}

/** PACKAGE/station.pem and chain.pem (issuer first, up to the root that actually signed it). */
async function writePackageCertificate(authority: Authority, packageDir: string, der: Buffer): Promise<void> {
  const rootName = await authority.directory.issuingRootOf(der);
  const chain = await authority.caChain(rootName, true);
  const target = join(packageDir, STATION_PACKAGE_FILES.certificate);
  const pem = encodePem('CERTIFICATE', der);
  const existing = await readFile(target, 'utf8').catch(() => undefined);
  if (existing !== pem) {
    await writeFile(`${target}.tmp`, pem, { mode: 0o644 });
    await rename(`${target}.tmp`, target);
  }
  const chainPath = join(packageDir, STATION_PACKAGE_FILES.chain);
  await writeFile(`${chainPath}.tmp`, chain.map((c) => encodePem('CERTIFICATE', c)).join(''), { mode: 0o644 });
  await rename(`${chainPath}.tmp`, chainPath);
}

function comparePackage(pkg: StationManifest, info: StationInfo, org: string): void {
  const differences: string[] = [];
  const same = (what: string, a: unknown, b: unknown): void => { if (a !== b) differences.push(`${what} ${JSON.stringify(a)} (recorded: ${JSON.stringify(b)})`); };
  same('line', pkg.line, info.line);
  same('batch', pkg.batch, info.batch);
  same('product', pkg.product, info.product);
  same('quota', pkg.quota, info.quota);
  same('validUntil', pkg.validUntil, info.validUntil);
  same('keyUri', pkg.keyUri, info.keyUri);
  same('deviceSubjectBase', pkg.deviceSubjectBase, info.deviceSubjectBase);
  same('org', pkg.org, org);
  same('devices', pkg.devices === null ? 'any key' : 'registered keys only', info.registeredOnly ? 'registered keys only' : 'any key');
  if (differences.length) throw new HallmarkError('STATION_MISMATCH', `the package of station ${info.id} does not match what station create recorded (line ${info.line}, batch ${info.batch}): ${differences.join('; ')}`);
}

function checkStationCertificate(cert: ParsedCertificate, info: StationInfo, requestedSubject: string): void {
  const fail = (what: string): never => { throw new HallmarkError('CA_CERT_MISMATCH', `the certificate of station ${info.id} ${what}`); };
  if (nameToString(cert.subject) !== requestedSubject) fail(`names ${nameToString(cert.subject)}, not the subject requested (${requestedSubject})`);
  const bc = cert.extensions.get(EXT.basicConstraints);
  const bcValue = bc ? decodeBasicConstraints(bc.value) : undefined;
  if (!bc?.critical || !bcValue?.ca) fail('is not a CA certificate (critical basicConstraints CA:TRUE)');
  if (bcValue!.pathLen !== 0) fail(`must have path length 0 (it has ${bcValue!.pathLen ?? 'none'}): sign it with --path-len 0`);
  const ku = cert.extensions.get(EXT.keyUsage);
  if (!ku || !decodeKeyUsage(ku.value).includes('keyCertSign')) fail('does not allow certificate signing (keyUsage keyCertSign)');
  const nc = cert.extensions.get(EXT.nameConstraints);
  if (!nc) fail(`has no name constraints: sign it with --permit-dn "${info.deviceSubjectBase}"`);
  if (!nc!.critical) fail('has name constraints that are not critical');
  const constraints = decodeNameConstraints(nc!.value);
  const expected = encodeNameString(info.deviceSubjectBase);
  if (constraints.excluded || constraints.other > 0 || constraints.directoryNames.length !== 1 || !constraints.directoryNames[0]!.equals(expected)) {
    fail(`must permit exactly the directory name "${info.deviceSubjectBase}" (its name constraints permit ${constraints.directoryNames.map((n) => `"${nameToString(n)}"`).join(', ') || 'no directory name'}${constraints.other ? ` and ${constraints.other} other name(s)` : ''}${constraints.excluded ? ', with excluded subtrees' : ''})`);
  }
  if (cert.notAfter.getTime() > new Date(info.validUntil).getTime()) fail(`ends ${cert.notAfter.toISOString()}, after the station's validUntil ${info.validUntil}: sign it with --not-after ${info.validUntil}`);
  if (cert.notAfter <= new Date()) fail('has expired');
}

/** NameConstraints (RFC 5280 §4.2.1.10): the permitted directoryName subtrees, how many other permitted names, and whether any are excluded. */
export function decodeNameConstraints(value: Buffer): { directoryNames: Buffer[]; other: number; excluded: boolean } {
  const top = readWhole(value, TAG.SEQUENCE, 'NameConstraints');
  const out = { directoryNames: [] as Buffer[], other: 0, excluded: false };
  for (const part of children(value, top)) {
    if (part.tag === 0xa1) { out.excluded = true; continue; }
    if (part.tag !== 0xa0) throw new HallmarkError('BAD_DER', 'NameConstraints: unexpected element');
    for (const subtree of children(value, part)) {
      if (subtree.tag !== TAG.SEQUENCE) throw new HallmarkError('BAD_DER', 'NameConstraints: GeneralSubtree is not a SEQUENCE');
      const [base, ...limits] = children(value, subtree);
      if (!base) throw new HallmarkError('BAD_DER', 'NameConstraints: empty GeneralSubtree');
      if (base.tag === 0xa4 && limits.length === 0) {
        const [name] = children(value, base);
        if (!name || name.tag !== TAG.SEQUENCE) throw new HallmarkError('BAD_DER', 'NameConstraints: directoryName is not a Name');
        out.directoryNames.push(Buffer.from(value.subarray(name.start, name.end)));
      } else {
        out.other++;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------- list

async function stationRow(authority: Authority, id: string, missing?: string): Promise<StationRow> {
  const row = await authority.store.db.selectFrom('stations').selectAll().where('id', '=', id).executeTakeFirst();
  if (!row) throw new HallmarkError('STATION_NOT_FOUND', missing ?? `no station ${JSON.stringify(id)}`);
  return row;
}

async function stationInfo(authority: Authority, row: StationRow): Promise<StationInfo> {
  return (await listStations(authority, row.id))[0]!;
}

export async function listStations(authority: Pick<Authority, 'store'>, id?: string): Promise<StationInfo[]> {
  let q = authority.store.db.selectFrom('stations')
    .innerJoin('certificate_authorities as ca', 'ca.id', 'stations.ca_id')
    .innerJoin('lines', 'lines.id', 'stations.line_id')
    .innerJoin('batches', 'batches.id', 'stations.batch_id')
    .innerJoin('products', 'products.id', 'batches.product_id')
    .selectAll('stations')
    .select(['ca.name as ca_name', 'ca.status as ca_status', 'ca.not_after as ca_not_after', 'lines.name as line_name', 'products.name as product_name', 'batches.issued_count']);
  if (id !== undefined) q = q.where('stations.id', '=', id);
  const rows = await q.orderBy('stations.created_at').execute();
  const now = Date.now();
  return rows.map((r) => ({
    id: r.id,
    ca: r.ca_name,
    status: r.ca_status === 'revoked' || r.ca_status === 'retired' ? 'revoked' : r.status === 'pending' ? 'pending' : new Date(r.ca_not_after ?? r.valid_until).getTime() <= now ? 'expired' : 'active',
    line: r.line_name,
    product: r.product_name,
    batch: r.batch_id,
    quota: Number(r.quota),
    issued: Number(r.issued_count),
    imported: Number(r.imported_count),
    refused: Number(r.refused_count),
    lastSeq: Number(r.last_seq),
    lastImportAt: r.last_import_at,
    validUntil: r.valid_until,
    keyUri: r.key_uri,
    deviceSubjectBase: r.subject_base,
    registeredOnly: Number(r.registered_only) === 1,
    createdAt: r.created_at,
    installedAt: r.installed_at,
  }));
}

// ---------------------------------------------------------------- import

/**
 * A problem with one journal entry (seq; 0 for the journal as a whole): those verifyJournal reports
 * (malformed, header, edited, gap, duplicate, forged, unsigned, over-quota, unknown-device, mismatch:
 * src/station/journal.ts) and this module's IMPORT_REFUSALS.
 */
export interface ImportProblem {
  readonly seq: number;
  readonly kind: string;
  readonly message: string;
  /** The journal line, when known. */
  readonly line?: number;
}

/** Why this module refuses an entry that verifyJournal accepted (the store decides these). */
export const IMPORT_REFUSALS = {
  'over-quota': 'the batch quota is used up',
  'unregistered-key': 'the key is not a registered device of the station\'s batch',
  clone: 'the UDID or key belongs to a device of another batch',
  'device-not-eligible': 'the device is suspended, revoked or decommissioned',
  conflict: 'another certificate was imported before under the same sequence number or serial',
  mismatch: 'the certificate does not match its entry or the station',
} as const;

export interface StationImportReport {
  readonly station: string;
  readonly ca: string;
  readonly line: string;
  readonly batch: string;
  /** Issue lines the journal holds. */
  readonly entries: number;
  readonly imported: readonly { readonly seq: number; readonly udid: string; readonly serial: string; readonly newDevice: boolean }[];
  /** Sequence numbers imported before (a journal imported again imports nothing). */
  readonly alreadyImported: readonly number[];
  /** Entries refused, and problems of the journal as a whole: nothing of these was imported. */
  readonly refused: readonly ImportProblem[];
  /** Not refusals: an incomplete last line (a write interrupted on the station; never handed out). */
  readonly notes: readonly ImportProblem[];
  readonly quota: { readonly quota: number; readonly issued: number; readonly remaining: number };
  /** Highest sequence number imported so far (over every import). */
  readonly lastSeq: number;
}

export interface ImportJournalOptions {
  /** The journal (JSON Lines) as text or bytes. */
  readonly journal: string | Buffer;
  /** When given, a journal of any other station is refused. */
  readonly station?: string;
  readonly actor: string;
}

/**
 * Imports a station journal. Everything that is imported is imported in one transaction: if the store
 * fails, nothing is. Entries verifyJournal flags, and entries refused here, are reported with their
 * reason and not imported; entries imported before are counted as such and skipped.
 */
export async function importJournal(authority: Authority, options: ImportJournalOptions): Promise<StationImportReport> {
  const bytes = typeof options.journal === 'string' ? Buffer.from(options.journal, 'utf8') : options.journal;
  if (bytes.length > JOURNAL_LIMITS.totalBytes) throw new HallmarkError('JOURNAL_INVALID', `the journal is ${bytes.length} bytes, over the ${JOURNAL_LIMITS.totalBytes}-byte limit`);
  const header = readHeader(bytes);
  if (options.station !== undefined && header.stationId !== options.station) throw new HallmarkError('STATION_MISMATCH', `the journal is station ${header.stationId}'s, not station ${options.station}'s`);
  const row = await stationRow(authority, header.stationId, `the journal is from station ${header.stationId}, which this authority does not know`);
  const info = await stationInfo(authority, row);
  if (header.batch !== info.batch) throw new HallmarkError('STATION_MISMATCH', `the journal names batch ${header.batch}, but station ${info.id} works for batch ${info.batch} (line ${info.line})`);
  if (row.status !== 'active') throw new HallmarkError('CA_NOT_ACTIVE', `station ${info.id} is not installed yet: run hallmark station install with the certificate the root signed`);
  const caRow = await authority.directory.caRow(info.ca);
  if (caRow.status !== 'active') throw new HallmarkError('CA_NOT_ACTIVE', `the CA of station ${info.id} is ${caRow.status}: nothing more is imported from it (its certificates were revoked with it)`);
  const stationDer = Buffer.from(caRow.certificate_der!);
  if (!Buffer.from(header.station, 'base64').equals(stationDer)) throw new HallmarkError('STATION_MISMATCH', `the journal was written by a station with another certificate than station ${info.id}'s (line ${info.line})`);
  const station = parseCertificate(stationDer);
  const roots = (await authority.directory.activeRoots()).map((r) => Buffer.from(r.certificate_der!));

  // Chain, signatures, checkpoints, subjects and SANs, duplicates within the journal: src/station/journal.ts.
  // The quota and the registered devices are the store's to decide (below), so they are not passed.
  const verified = await verifyJournal(bytes, { stationCertificate: stationDer, trustedRoots: roots });
  const notes = verified.problems.filter((p) => p.kind === 'torn').map(toImportProblem);
  const journalProblems = verified.problems.filter((p) => p.kind !== 'torn').map(toImportProblem);
  const flagged = new Set(journalProblems.map((p) => p.seq));
  const refused: ImportProblem[] = [];
  const refuse = (c: { seq: number; line: number }, kind: keyof typeof IMPORT_REFUSALS, detail?: string): void => {
    refused.push({ seq: c.seq, line: c.line, kind, message: `seq ${c.seq} (line ${c.line}): ${IMPORT_REFUSALS[kind]}${detail ? ` (${detail})` : ''}` });
  };
  const subjectBase = encodeSubjectBase(info.deviceSubjectBase);
  const candidates: Candidate[] = [];
  for (const entry of verified.entries) {
    if (flagged.has(entry.seq)) continue;
    const checked = checkEntry(entry, station, subjectBase, info);
    if (typeof checked === 'string') { refuse(entry, 'mismatch', checked); continue; }
    candidates.push(checked);
  }

  const imported: { seq: number; udid: string; serial: string; newDevice: boolean }[] = [];
  const alreadyImported: number[] = [];
  const result = await authority.store.writeTransaction(async (trx) => {
    const audit: AuditEvent[] = [];
    const known = new Map<number, string>();
    for (const e of await trx.selectFrom('station_entries').select(['seq', 'fingerprint_sha256']).where('station_id', '=', info.id).execute()) known.set(Number(e.seq), e.fingerprint_sha256);
    const batch = await trx.selectFrom('batches').select(['id', 'quota', 'issued_count', 'product_id', 'line_id']).where('id', '=', info.batch).executeTakeFirstOrThrow();
    const current = await trx.selectFrom('stations').select(['last_seq']).where('id', '=', info.id).executeTakeFirstOrThrow();
    const now = nowIso();
    await ensureTenant(trx, DEFAULT_TENANT, now);
    // Decided in memory, chunk by chunk, from a few bulk reads; written with multi-row statements. The write
    // transaction holds the store's write lock (BEGIN IMMEDIATE / the advisory lock), so what is read here
    // stays true until the commit; the quota update below re-checks the quota anyway.
    const quota = Number(batch.quota);
    let issued = Number(batch.issued_count);
    let overQuota = 0;
    const fresh = candidates.filter((c) => {
      const before = known.get(c.seq);
      if (before === undefined) return true;
      if (before === c.fingerprint) alreadyImported.push(c.seq);
      else refuse(c, 'conflict', `seq ${c.seq} was imported before with certificate SHA-256 ${before.slice(0, 16)}…`);
      return false;
    });
    type Holder = { udid: string; batch_id: string; public_key_sha256: string; state: string; serial_number: string | null };
    for (let i = 0; i < fresh.length; i += IMPORT_CHUNK) {
      const chunk = fresh.slice(i, i + IMPORT_CHUNK);
      const recorded = new Map((await trx.selectFrom('certificates').select(['serial', 'fingerprint_sha256']).where('issuer_id', '=', caRow.id).where('serial', 'in', chunk.map((c) => c.serial)).execute())
        .map((r) => [r.serial, r.fingerprint_sha256]));
      const holders = await trx.selectFrom('devices').select(['udid', 'batch_id', 'public_key_sha256', 'state', 'serial_number'])
        .where((eb) => eb.or([eb('udid', 'in', chunk.map((c) => c.udid)), eb('public_key_sha256', 'in', chunk.map((c) => c.keyHash))])).execute();
      const byUdid = new Map<string, Holder>(holders.map((h) => [h.udid, h]));
      const byKey = new Map<string, Holder>(holders.map((h) => [h.public_key_sha256, h]));
      const newDevices: Holder[] = [];
      const provisioned: { udid: string; serialNumber: string | null }[] = [];
      const accepted: { c: Candidate; firstIdentity: boolean; newDevice: boolean }[] = [];
      for (const c of chunk) {
        const sameSerial = recorded.get(c.serial);
        if (sameSerial !== undefined) {
          if (sameSerial === c.fingerprint) alreadyImported.push(c.seq);
          else refuse(c, 'conflict', `serial ${c.serial} is already recorded for another certificate of ${info.ca}`);
          continue;
        }
        const withUdid = byUdid.get(c.udid);
        const withKey = byKey.get(c.keyHash);
        const device = withUdid && withUdid === withKey ? withUdid : undefined;
        const other = device ? undefined : withUdid ?? withKey;
        if (other) {
          if (other.batch_id !== info.batch) refuse(c, 'clone', `device ${other.udid} of batch ${other.batch_id} holds ${other.udid === c.udid ? 'this UDID' : 'this key'}`);
          else refuse(c, info.registeredOnly ? 'unregistered-key' : 'mismatch', `UDID ${c.udid} and the key belong to different devices of the batch (${other.udid})`);
          continue;
        }
        if (device && device.batch_id !== info.batch) { refuse(c, 'clone', `device ${device.udid} is registered in batch ${device.batch_id}`); continue; }
        if (!device && info.registeredOnly) { refuse(c, 'unregistered-key', `UDID ${c.udid}`); continue; }
        if (device && !['registered', 'provisioned', 'active'].includes(device.state)) { refuse(c, 'device-not-eligible', `device ${device.udid} is ${device.state}`); continue; }
        // Quota counts first identities, as on every issuance path (Registry.reserveIssuance).
        const firstIdentity = !device || device.state === 'registered';
        if (firstIdentity && issued >= quota) {
          overQuota++;
          refuse(c, 'over-quota', `batch ${info.batch} has used its quota of ${quota}`);
          audit.push({ actor: options.actor, action: 'issuance.quota_exceeded', target: c.udid, details: { batch: info.batch, station: info.id, seq: c.seq, serial: c.serial, code: 'QUOTA_EXCEEDED', reason: `batch ${info.batch} has used its quota of ${quota}: station ${info.id} signed beyond it` } });
          continue;
        }
        if (firstIdentity) issued++;
        if (!device) {
          const h: Holder = { udid: c.udid, batch_id: info.batch, public_key_sha256: c.keyHash, state: 'provisioned', serial_number: c.serialNumber };
          newDevices.push(h);
          byUdid.set(h.udid, h);
          byKey.set(h.public_key_sha256, h);
          audit.push({ actor: options.actor, action: 'device.register', target: c.udid, details: { batch: info.batch, tenant: DEFAULT_TENANT, source: 'station.import', station: info.id, seq: c.seq } });
        } else if (device.state === 'registered') {
          provisioned.push({ udid: device.udid, serialNumber: device.serial_number === null ? c.serialNumber : null });
          device.state = 'provisioned';
        }
        recorded.set(c.serial, c.fingerprint);
        known.set(c.seq, c.fingerprint);
        accepted.push({ c, firstIdentity, newDevice: !device });
        audit.push({ actor: options.actor, action: 'certificate.issue', target: c.serial, details: {
          device: c.udid, batch: info.batch, line: info.line, issuer: info.ca, profile: 'device', subject: c.subjectText, fingerprintSha256: c.fingerprint, firstIdentity, notAfter: nowIso(c.notAfter),
          station: info.id, seq: c.seq, signedAt: c.at,
        } });
      }
      const taken = accepted.filter((a) => a.firstIdentity).length;
      if (taken) {
        const r = await trx.updateTable('batches').set((eb) => ({ issued_count: eb('issued_count', '+', taken) })).where('id', '=', info.batch).where((eb) => eb(eb('issued_count', '+', taken), '<=', quota)).executeTakeFirst();
        if (Number(r.numUpdatedRows) !== 1) throw new HallmarkError('INTERNAL', `the quota of batch ${info.batch} changed during the import; import the journal again`);
      }
      const byCandidate = new Map(chunk.map((c) => [c.udid, c]));
      for (let j = 0; j < newDevices.length; j += INSERT_ROWS) {
        await trx.insertInto('devices').values(newDevices.slice(j, j + INSERT_ROWS).map((h) => ({
          udid: h.udid, public_key_spki: byCandidate.get(h.udid)!.spki, public_key_sha256: h.public_key_sha256, serial_number: h.serial_number, product_id: Number(batch.product_id),
          line_id: Number(batch.line_id), batch_id: info.batch, tenant: DEFAULT_TENANT, birth_cert_der: null, state: 'provisioned' as const, created_at: now, updated_at: now, provisioned_at: now,
        }))).execute();
      }
      const plain = provisioned.filter((p) => p.serialNumber === null).map((p) => p.udid);
      if (plain.length) await trx.updateTable('devices').set({ state: 'provisioned', provisioned_at: now, updated_at: now }).where('udid', 'in', plain).where('state', '=', 'registered').execute();
      for (const p of provisioned.filter((x) => x.serialNumber !== null)) {
        await trx.updateTable('devices').set({ state: 'provisioned', provisioned_at: now, updated_at: now, serial_number: p.serialNumber }).where('udid', '=', p.udid).where('state', '=', 'registered').execute();
      }
      for (let j = 0; j < accepted.length; j += INSERT_ROWS) {
        const rows = accepted.slice(j, j + INSERT_ROWS);
        await trx.insertInto('certificates').values(rows.map(({ c }) => ({
          issuer_id: caRow.id, serial: c.serial, profile: 'device', subject: c.subjectText, fingerprint_sha256: c.fingerprint, not_before: nowIso(c.notBefore), not_after: nowIso(c.notAfter),
          der: c.der, status: 'valid' as const, revoked_at: null, revocation_reason: null, requested_by: `${options.actor} (station ${info.id})`, created_at: now, device_udid: c.udid,
        }))).execute();
        await trx.insertInto('station_entries').values(rows.map(({ c }) => ({ station_id: info.id, seq: c.seq, serial: c.serial, fingerprint_sha256: c.fingerprint, udid: c.udid, signed_at: c.at, imported_at: now }))).execute();
      }
      for (const a of accepted) imported.push({ seq: a.c.seq, udid: a.c.udid, serial: a.c.serial, newDevice: a.newDevice });
    }
    if (overQuota) {
      await trx.updateTable('batches').set((eb) => ({ refused_count: eb('refused_count', '+', overQuota) })).where('id', '=', info.batch).execute();
      await trx.updateTable('lines').set((eb) => ({ refused_issuances: eb('refused_issuances', '+', overQuota) })).where('id', '=', Number(batch.line_id)).execute();
    }
    // A gap that entries imported before fill is no gap (a journal exported in parts).
    const present = [...new Set([...verified.entries.map((e) => e.seq), ...journalProblems.map((p) => p.seq)])].sort((a, b) => a - b);
    const filled = (p: ImportProblem): boolean => {
      if (p.kind !== 'gap') return false;
      const to = (present.find((s) => s > p.seq) ?? p.seq + 1) - 1;
      for (let s = p.seq; s <= to; s++) if (!known.has(s)) return false;
      return true;
    };
    refused.unshift(...journalProblems.filter((p) => !filled(p)));
    const lastSeq = Math.max(Number(current.last_seq), ...imported.map((i) => i.seq));
    await trx.updateTable('stations').set((eb) => ({
      imported_count: eb('imported_count', '+', imported.length),
      // Every refusal of every import (an entry refused again by a later import counts again).
      refused_count: eb('refused_count', '+', refused.length),
      last_seq: lastSeq,
      last_import_at: now,
    })).where('id', '=', info.id).execute();
    audit.push({ actor: options.actor, action: 'station.import', target: info.id, details: {
      batch: info.batch, line: info.line, entries: verified.issueLines, imported: imported.length, alreadyImported: alreadyImported.length,
      refused: countKinds(refused), refusedEntries: refused.slice(0, 100).map((p) => ({ seq: p.seq, kind: p.kind })), lastSeq,
    } });
    await appendAudit(trx, audit);
    const after = await trx.selectFrom('batches').select(['issued_count', 'quota']).where('id', '=', info.batch).executeTakeFirstOrThrow();
    return { lastSeq, issued: Number(after.issued_count), quota: Number(after.quota) };
  });
  refused.sort((a, b) => a.seq - b.seq || (a.line ?? 0) - (b.line ?? 0));
  return {
    station: info.id, ca: info.ca, line: info.line, batch: info.batch, entries: verified.issueLines, imported, alreadyImported, refused, notes,
    quota: { quota: result.quota, issued: result.issued, remaining: Math.max(0, result.quota - result.issued) }, lastSeq: result.lastSeq,
  };
}

/** Journal entries decided per round of bulk reads. */
const IMPORT_CHUNK = 500;
/** Rows per multi-row INSERT (SQLite allows 32,766 bound parameters; certificates have 14 columns). */
const INSERT_ROWS = 200;

const toImportProblem = (p: JournalProblem): ImportProblem => ({ seq: p.seq, kind: p.kind, message: p.message, line: p.line });

function countKinds(problems: readonly ImportProblem[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const p of problems) out[p.kind] = (out[p.kind] ?? 0) + 1;
  return out;
}

interface Candidate {
  readonly seq: number;
  readonly line: number;
  readonly at: string;
  readonly udid: string;
  readonly serialNumber: string | null;
  readonly der: Buffer;
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly serial: string;
  readonly fingerprint: string;
  readonly subjectText: string;
  readonly spki: Buffer;
  readonly keyHash: string;
}

/**
 * What the store needs of a verified entry, re-checked against this station's record (verifyJournal has
 * checked signatures, subject and SANs): a string says why it does not fit.
 */
function checkEntry(entry: VerifiedIssue, station: ParsedCertificate, subjectBase: Buffer, info: StationInfo): Candidate | string {
  let cert: ParsedCertificate;
  try { cert = parseCertificate(entry.certificate); } catch (err) { return `not a certificate: ${(err as Error).message}`; }
  if (!cert.issuer.equals(station.subject)) return 'issued by another CA';
  let udid: string;
  try { udid = normaliseUdid(entry.udid); } catch { return `UDID ${JSON.stringify(entry.udid)} is malformed`; }
  const expected = deviceSubject(subjectBase, udid);
  if (!cert.subject.equals(expected)) return `subject ${nameToString(cert.subject)} is not ${nameToString(expected)}`;
  if (cert.notAfter > station.notAfter) return 'it outlives the station certificate';
  let spki: Buffer;
  try { spki = canonicalSpki(cert.subjectPublicKeyInfo); } catch { return 'its public key cannot be read'; }
  const keyHash = udidOfKey(spki);
  if (!info.registeredOnly && udid !== keyHash) return `UDID ${udid} is not the SHA-256 of the certified key`;
  const at = Number.isNaN(Date.parse(entry.at)) ? nowIso(cert.notBefore) : new Date(entry.at).toISOString();
  return {
    seq: entry.seq, line: entry.line, at, udid, serialNumber: entry.serialNumber, der: cert.der, notBefore: cert.notBefore, notAfter: cert.notAfter,
    serial: serialToHex(Buffer.from(cert.serialHex, 'hex')), fingerprint: sha256Fingerprint(cert.der), subjectText: nameToString(cert.subject), spki, keyHash,
  };
}

/** The first line of the journal: which station and batch it says it is from (to find the station before verifying). */
function readHeader(bytes: Buffer): { stationId: string; batch: string; station: string } {
  const end = bytes.indexOf(0x0a);
  const first = bytes.subarray(0, Math.min(end < 0 ? bytes.length : end, JOURNAL_LIMITS.lineBytes)).toString('utf8').trim();
  let header: Record<string, unknown>;
  try { header = JSON.parse(first) as Record<string, unknown>; } catch { throw new HallmarkError('JOURNAL_INVALID', 'the journal does not start with a JSON header line (is it a station journal?)'); }
  if (header?.type !== 'header' || header.format !== JOURNAL_FORMAT) throw new HallmarkError('JOURNAL_INVALID', `not a station journal (its first line is not a ${JOURNAL_FORMAT} header)`);
  if (header.version !== 1) throw new HallmarkError('JOURNAL_INVALID', `unsupported journal version ${JSON.stringify(header.version)}`);
  for (const f of ['stationId', 'batch', 'station']) if (typeof header[f] !== 'string' || !header[f]) throw new HallmarkError('JOURNAL_INVALID', `the journal header has no ${f}`);
  return header as { stationId: string; batch: string; station: string };
}
