// A factory station package: what HQ hands an offline factory station ("Company A", docs/factory.md).
//
//   PACKAGE/station.json   the manifest (format below), strictly checked: every field, no unknown field
//   PACKAGE/station.pem    the station's sub-CA certificate: root-signed, pathLen 0, critical name
//                          constraints permitting exactly deviceSubjectBase as a directoryName subtree,
//                          and the SHA-256 of station.json (EXT.stationManifest: the root signs off the
//                          quota, validity and device list, which the factory therefore cannot change)
//   PACKAGE/chain.pem      the certificates above it up to and including the root, issuer first
//
// The online side (`hallmark station create` / `station install`) writes packages with
// writeStationPackage; the station (`hallmark station init`) and the journal import read them with
// readStationPackage / checkStationPackage. Nothing here touches a key or the network.

import { createHash } from 'node:crypto';
import { mkdir, open as openFile, rename, stat, writeFile } from 'node:fs/promises';
import { FileOverLimit, readFileWithin } from '../files.js';
import { join } from 'node:path';
import { HallmarkError } from '../errors.js';
import { PROFILES } from '../authority/profiles.js';
import { keyAlgorithmOf, publicKeyFromSpki, type KeyAlgorithm } from '../pki/algorithms.js';
import { parseCertificate, type ParsedCertificate } from '../pki/certificate.js';
import { TAG, children, content, oid, readTlv, readWhole, seq, set, utf8String, whole, type Tlv } from '../pki/der.js';
import { EXT, decodeBasicConstraints, decodeKeyUsage, decodeStationManifestDigest, decodeSubjectKeyId, keyIdentifier } from '../pki/extensions.js';
import { decodeName, encodeNameString, nameToString, parseNameString } from '../pki/names.js';
import { SIZE_LIMITS, decodePemBlocks, encodePem } from '../pki/pem.js';
import { verifyIssuedBy } from '../pki/verify.js';
import { parsePkcs11Uri } from '../keys/pkcs11-backend.js';

export const STATION_PACKAGE_FORMAT = 'hallmark-station-package';
export const STATION_PACKAGE_VERSION = 1;

export const PACKAGE_FILES = { manifest: 'station.json', certificate: 'station.pem', chain: 'chain.pem' } as const;

export const PACKAGE_LIMITS = {
  /** station.json, device list included (~200 bytes a device). */
  manifestBytes: 256 * 1024 * 1024,
  maxDevices: 1_000_000,
  maxQuota: 100_000_000,
  /** station.pem as text. */
  certificateBytes: 2 * SIZE_LIMITS.certificate,
  /** chain.pem as text. */
  chainBytes: 2 * SIZE_LIMITS.chain,
  /** Certificates in chain.pem. */
  maxChainLength: 8,
} as const;

/** A device the batch registered at HQ: only these keys may be signed when the list is given. */
export interface StationDevice {
  readonly udid: string;
  readonly serialNumber: string | null;
  /** Hex SHA-256 of the device key's SubjectPublicKeyInfo DER (the registry's public_key_sha256). */
  readonly publicKeySha256: string;
}

/** station.json. Keys in this order; no other key is accepted. */
export interface StationManifest {
  readonly format: typeof STATION_PACKAGE_FORMAT;
  readonly version: 1;
  readonly stationId: string;
  readonly line: string;
  readonly product: string;
  readonly batch: string;
  readonly org: string;
  readonly quota: number;
  /** ISO 8601; the station signs nothing from then on. */
  readonly validUntil: string;
  /** DN text ("O=Acme,OU=thermostat,OU=batch b-1234"); device subjects are this DN followed by CN=<UDID>. */
  readonly deviceSubjectBase: string;
  readonly deviceValidityDays: number;
  /** null: any key, UDID = hex SHA-256 of its SPKI; a list: only these keys. */
  readonly devices: readonly StationDevice[] | null;
  /** RFC 7512 URI of the sub-CA key in the token (token= and id= required). */
  readonly keyUri: string;
  readonly createdAt: string;
}

const MANIFEST_KEYS = ['format', 'version', 'stationId', 'line', 'product', 'batch', 'org', 'quota', 'validUntil', 'deviceSubjectBase', 'deviceValidityDays', 'devices', 'keyUri', 'createdAt'] as const;
const DEVICE_KEYS = ['udid', 'serialNumber', 'publicKeySha256'] as const;

/** A checked package. */
export interface StationPackage {
  readonly manifest: StationManifest;
  /** station.pem. */
  readonly certificate: ParsedCertificate;
  /** chain.pem: issuer of station.pem first, the self-signed root last. */
  readonly chain: readonly ParsedCertificate[];
  readonly root: ParsedCertificate;
  /** DER of the permitted directoryName subtree (= deviceSubjectBase). */
  readonly subjectBase: Buffer;
  /** The station's key identifier (its certificate's subjectKeyIdentifier). */
  readonly keyId: Buffer;
  readonly keyAlgorithm: KeyAlgorithm;
  /** The end of the signing window: the earlier of validUntil and the certificate's notAfter. */
  readonly signsUntil: Date;
  /** Registered devices by publicKeySha256 (empty when devices is null). */
  readonly devicesByKey: ReadonlyMap<string, StationDevice>;
  /** Whether station.pem carries the digest of station.json (checked: it matched). */
  readonly manifestBound: boolean;
}

export interface PackageCheckOptions {
  /** Time for the validity checks (default now). */
  readonly now?: Date;
  /** Refuse a package past its validity or not yet valid (default true). An import of a journal passes false. */
  readonly checkValidity?: boolean;
  /** DER root certificates: chain.pem's root must be one of them. */
  readonly trustedRoots?: readonly Buffer[];
  /**
   * Refuse a station.pem without the digest of station.json (EXT.stationManifest). Set where a package is
   * installed (HQ's `station install`, the station's `station init`); an already initialised station made
   * before the binding keeps working, and a digest that is present is always checked.
   */
  readonly requireBoundManifest?: boolean;
}

// ---------------------------------------------------------------- manifest

const invalid = (message: string, cause?: unknown): HallmarkError =>
  new HallmarkError('STATION_PACKAGE_INVALID', message, cause === undefined ? undefined : { cause });

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
const STATION_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;
const ISO_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$/;
const UDID = /^(?:[0-9a-f]{2}){1,32}$/;
const SHA256_HEX = /^[0-9a-f]{64}$/;
// X.520 serialNumber is a PrintableString; the registry keeps serials to 64 characters.
const SERIAL = /^[A-Za-z0-9 '()+,\-./:=?]{1,64}$/;

function isoTime(value: unknown, field: string): Date {
  if (typeof value !== 'string' || !ISO_TIME.test(value)) throw invalid(`station.json: ${field} must be an ISO 8601 time (2026-12-31T23:59:59Z), not ${JSON.stringify(value)}`);
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) throw invalid(`station.json: ${field} is not a valid time: ${value}`);
  return d;
}

function integer(value: unknown, field: string, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw invalid(`station.json: ${field} must be a whole number from ${min} to ${max}, not ${JSON.stringify(value)}`);
  }
  return value;
}

function text(value: unknown, field: string, pattern: RegExp, what: string): string {
  if (typeof value !== 'string' || !pattern.test(value)) throw invalid(`station.json: ${field} must be ${what}, not ${JSON.stringify(value)?.slice(0, 80)}`);
  return value;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The DER of a deviceSubjectBase, checked: known attributes, no CN (the station appends CN=<UDID>). */
export function encodeSubjectBase(base: string): Buffer {
  let attributes;
  try {
    attributes = parseNameString(base);
  } catch (err) {
    throw invalid(`station.json: deviceSubjectBase ${JSON.stringify(base)} is not a distinguished name: ${(err as Error).message}`, err);
  }
  if (attributes.some((a) => a.type === 'CN')) throw invalid('station.json: deviceSubjectBase must not contain CN (the station appends CN=<UDID> to it)');
  try {
    return encodeNameString(base);
  } catch (err) {
    throw invalid(`station.json: deviceSubjectBase ${JSON.stringify(base)} cannot be encoded: ${(err as Error).message}`, err);
  }
}

/** Parses and checks station.json (text, bytes or an already-parsed object). Throws STATION_PACKAGE_INVALID naming the field. */
export function parseStationManifest(input: string | Buffer | unknown): StationManifest {
  let value: unknown = input;
  if (typeof input === 'string' || Buffer.isBuffer(input)) {
    if (input.length > PACKAGE_LIMITS.manifestBytes) throw invalid(`station.json is over the ${PACKAGE_LIMITS.manifestBytes}-byte limit`);
    try {
      value = JSON.parse(typeof input === 'string' ? input : input.toString('utf8'));
    } catch (err) {
      throw invalid(`station.json is not JSON: ${(err as Error).message}`);
    }
  }
  if (!isPlainObject(value)) throw invalid('station.json must hold a JSON object');
  const m = value;
  for (const k of Object.keys(m)) {
    if (!(MANIFEST_KEYS as readonly string[]).includes(k)) throw invalid(`station.json: unknown field ${JSON.stringify(k)} (format ${STATION_PACKAGE_FORMAT} version 1 has ${MANIFEST_KEYS.join(', ')})`);
  }
  for (const k of MANIFEST_KEYS) if (!(k in m)) throw invalid(`station.json: missing field ${k}`);
  if (m.format !== STATION_PACKAGE_FORMAT) throw invalid(`station.json: format must be ${JSON.stringify(STATION_PACKAGE_FORMAT)}, not ${JSON.stringify(m.format)}`);
  if (m.version !== STATION_PACKAGE_VERSION) throw invalid(`station.json: version ${JSON.stringify(m.version)} is not supported (this station reads version ${STATION_PACKAGE_VERSION})`);
  const stationId = text(m.stationId, 'stationId', STATION_ID, '1-128 letters, digits, dot, dash, colon or underscore');
  const line = text(m.line, 'line', NAME, 'a line name (1-63 letters, digits, dot, dash or underscore)');
  const product = text(m.product, 'product', NAME, 'a product name (1-63 letters, digits, dot, dash or underscore)');
  const batch = text(m.batch, 'batch', NAME, 'a batch id (1-63 letters, digits, dot, dash or underscore)');
  if (typeof m.org !== 'string' || m.org.length === 0 || m.org.length > 256 || /[\x00-\x1f\x7f]/.test(m.org)) throw invalid('station.json: org must be 1-256 printable characters');
  const quota = integer(m.quota, 'quota', 1, PACKAGE_LIMITS.maxQuota);
  isoTime(m.validUntil, 'validUntil');
  if (typeof m.deviceSubjectBase !== 'string' || m.deviceSubjectBase.length === 0) throw invalid('station.json: deviceSubjectBase must be a distinguished name (O=Acme,OU=thermostat,...)');
  encodeSubjectBase(m.deviceSubjectBase);
  const deviceValidityDays = integer(m.deviceValidityDays, 'deviceValidityDays', 1, PROFILES.device.maxValidityDays);
  let devices: StationDevice[] | null = null;
  if (m.devices !== null) {
    if (!Array.isArray(m.devices)) throw invalid('station.json: devices must be null (any device key) or a list of registered devices');
    if (m.devices.length > PACKAGE_LIMITS.maxDevices) throw invalid(`station.json: devices lists ${m.devices.length} devices, over the limit of ${PACKAGE_LIMITS.maxDevices}`);
    const udids = new Set<string>();
    const keys = new Set<string>();
    devices = m.devices.map((d: unknown, i: number) => {
      const where = `devices[${i}]`;
      if (!isPlainObject(d)) throw invalid(`station.json: ${where} must be an object {udid, serialNumber, publicKeySha256}`);
      for (const k of Object.keys(d)) if (!(DEVICE_KEYS as readonly string[]).includes(k)) throw invalid(`station.json: ${where} has an unknown field ${JSON.stringify(k)}`);
      for (const k of DEVICE_KEYS) if (!(k in d)) throw invalid(`station.json: ${where} has no ${k}`);
      const udid = text(d.udid, `${where}.udid`, UDID, '1-32 bytes of lowercase hex');
      const serialNumber = d.serialNumber === null ? null : text(d.serialNumber, `${where}.serialNumber`, SERIAL, 'null or 1-64 printable characters');
      const publicKeySha256 = text(d.publicKeySha256, `${where}.publicKeySha256`, SHA256_HEX, '64 lowercase hex digits (SHA-256 of the key\'s SPKI)');
      if (udids.has(udid)) throw invalid(`station.json: ${where}: UDID ${udid} is listed twice`);
      if (keys.has(publicKeySha256)) throw invalid(`station.json: ${where}: key ${publicKeySha256} is listed twice`);
      udids.add(udid);
      keys.add(publicKeySha256);
      return { udid, serialNumber, publicKeySha256 };
    });
  }
  if (typeof m.keyUri !== 'string' || m.keyUri.length > 2048) throw invalid('station.json: keyUri must be a pkcs11: URI');
  let uri;
  try {
    uri = parsePkcs11Uri(m.keyUri);
  } catch (err) {
    throw invalid(`station.json: keyUri: ${(err as Error).message}`, err);
  }
  if (!uri.token || !uri.id?.length) throw invalid('station.json: keyUri must name the token (token=) and the key (id=)');
  isoTime(m.createdAt, 'createdAt');
  return {
    format: STATION_PACKAGE_FORMAT, version: 1, stationId, line, product, batch, org: m.org, quota,
    validUntil: m.validUntil as string, deviceSubjectBase: m.deviceSubjectBase, deviceValidityDays, devices, keyUri: m.keyUri, createdAt: m.createdAt as string,
  };
}

/** station.json text: the manifest's keys in the contract's order, two-space indented, final newline. */
export function serializeManifest(manifest: StationManifest): string {
  const checked = parseStationManifest(manifest);
  const ordered: Record<string, unknown> = {};
  for (const k of MANIFEST_KEYS) ordered[k] = k === 'devices' && checked.devices ? checked.devices.map((d) => ({ udid: d.udid, serialNumber: d.serialNumber, publicKeySha256: d.publicKeySha256 })) : checked[k];
  return JSON.stringify(ordered, null, 2) + '\n';
}

// ---------------------------------------------------------------- the station certificate

/** The permitted directoryName subtrees of a NameConstraints extension value, and whether it has others. */
function permittedDirectoryNames(value: Buffer): { directoryNames: Buffer[]; excluded: boolean } {
  const top = readWhole(value, TAG.SEQUENCE, 'NameConstraints');
  const directoryNames: Buffer[] = [];
  let excluded = false;
  for (const part of children(value, top)) {
    if (part.tag === 0xa1) { excluded = true; continue; }
    if (part.tag !== 0xa0) throw new HallmarkError('BAD_DER', 'NameConstraints: unexpected element');
    for (const subtree of children(value, part)) {
      if (subtree.tag !== TAG.SEQUENCE) throw new HallmarkError('BAD_DER', 'NameConstraints: GeneralSubtree is not a SEQUENCE');
      const [base, ...rest] = children(value, subtree) as [Tlv, ...Tlv[]];
      if (!base) throw new HallmarkError('BAD_DER', 'NameConstraints: empty GeneralSubtree');
      if (rest.some((r) => r.tag === 0xa1 || (r.tag === 0x80 && content(value, r).some((b) => b !== 0)))) throw new HallmarkError('BAD_DER', 'NameConstraints: minimum/maximum are not allowed (RFC 5280 4.2.1.10)');
      if (base.tag === 0xa4) {
        const name = readTlv(value, base.contentStart, base.end);
        if (name.tag !== TAG.SEQUENCE || name.end !== base.end) throw new HallmarkError('BAD_DER', 'NameConstraints: bad directoryName');
        directoryNames.push(whole(value, name));
      }
    }
  }
  return { directoryNames, excluded };
}

function sameName(a: Buffer, b: Buffer): boolean {
  if (a.equals(b)) return true;
  try {
    return JSON.stringify(decodeName(a)) === JSON.stringify(decodeName(b));
  } catch {
    return false;
  }
}

export interface StationCertificateFacts {
  /** DER of the one permitted directoryName subtree. */
  readonly subjectBase: Buffer;
  readonly keyId: Buffer;
  readonly keyAlgorithm: KeyAlgorithm;
}

/**
 * Checks what makes a certificate a station certificate: CA, pathLen 0, keyCertSign, and critical name
 * constraints with exactly one permitted directoryName subtree (equal to `expectedBase` when given).
 * Throws STATION_PACKAGE_INVALID naming what is wrong.
 */
export function checkStationCertificate(cert: ParsedCertificate, expectedBase?: Buffer): StationCertificateFacts {
  const bad = (what: string): never => { throw invalid(`station.pem: ${what}`); };
  if (cert.version !== 3) bad('is not an X.509 v3 certificate');
  const bc = cert.extensions.get(EXT.basicConstraints);
  if (!bc) bad('has no basicConstraints (it must be a CA certificate with pathLen 0)');
  let constraints: { ca: boolean; pathLen?: number } = { ca: false };
  try { constraints = decodeBasicConstraints(bc!.value); } catch { bad('has a malformed basicConstraints'); }
  if (!bc!.critical || !constraints.ca) bad('is not a CA certificate (basicConstraints cA must be true and critical)');
  if (constraints.pathLen !== 0) bad(`must have pathLen 0 so that it can sign only device certificates, not ${constraints.pathLen === undefined ? 'no limit' : constraints.pathLen}`);
  const ku = cert.extensions.get(EXT.keyUsage);
  let usages: string[] = [];
  try { usages = ku ? decodeKeyUsage(ku.value) : []; } catch { bad('has a malformed keyUsage'); }
  if (!usages.includes('keyCertSign')) bad('keyUsage does not allow keyCertSign');
  const nc = cert.extensions.get(EXT.nameConstraints);
  if (!nc) bad('has no name constraints (it must permit only the batch\'s device subject subtree)');
  if (!nc!.critical) bad('name constraints must be critical');
  let permitted: { directoryNames: Buffer[]; excluded: boolean } = { directoryNames: [], excluded: false };
  try { permitted = permittedDirectoryNames(nc!.value); } catch (err) { bad(`malformed name constraints: ${(err as Error).message}`); }
  if (permitted.directoryNames.length !== 1) bad(`name constraints must permit exactly one directoryName subtree (the device subject base), not ${permitted.directoryNames.length}`);
  const subjectBase = permitted.directoryNames[0]!;
  if (expectedBase && !sameName(subjectBase, expectedBase)) {
    bad(`name constraints permit ${safeNameText(subjectBase)}, but station.json's deviceSubjectBase is ${safeNameText(expectedBase)}`);
  }
  let keyAlgorithm: KeyAlgorithm = 'ecdsa-p256';
  try { keyAlgorithm = keyAlgorithmOf(publicKeyFromSpki(cert.subjectPublicKeyInfo)); } catch (err) { bad(`its key is not one a station can hold: ${(err as Error).message}`); }
  const skiExt = cert.extensions.get(EXT.subjectKeyIdentifier);
  let keyId: Buffer;
  try { keyId = skiExt ? decodeSubjectKeyId(skiExt.value) : keyIdentifier(cert.subjectPublicKeyInfo); } catch { return bad('has a malformed subjectKeyIdentifier'); }
  return { subjectBase, keyId, keyAlgorithm };
}

function safeNameText(der: Buffer): string {
  try { return JSON.stringify(nameToString(der)); } catch { return '(undecodable name)'; }
}

const CN_OID = oid('2.5.4.3');

/** The subject of a device certificate: the RDNs of `subjectBase` (DER Name) followed by CN=<UDID>. */
export function deviceSubject(subjectBase: Buffer, udid: string): Buffer {
  const t = readWhole(subjectBase, TAG.SEQUENCE, 'Name');
  return seq(content(subjectBase, t), set(seq(CN_OID, utf8String(udid))));
}

function checkCaInChain(cert: ParsedCertificate, position: string, casBelow: number): void {
  const bc = cert.extensions.get(EXT.basicConstraints);
  let c: { ca: boolean; pathLen?: number } = { ca: false };
  try { if (bc) c = decodeBasicConstraints(bc.value); } catch { /* reported below */ }
  if (!bc || !c.ca) throw invalid(`chain.pem: ${position} (${safeNameText(cert.subject)}) is not a CA certificate`);
  if (c.pathLen !== undefined && c.pathLen < casBelow) throw invalid(`chain.pem: ${position} (${safeNameText(cert.subject)}) allows ${c.pathLen} CA certificate(s) below it, but the chain has ${casBelow}`);
  const ku = cert.extensions.get(EXT.keyUsage);
  if (ku) {
    let usages: string[] = [];
    try { usages = decodeKeyUsage(ku.value); } catch { /* empty: refused below */ }
    if (!usages.includes('keyCertSign')) throw invalid(`chain.pem: ${position} (${safeNameText(cert.subject)}) may not sign certificates (keyUsage)`);
  }
}

function checkTime(cert: ParsedCertificate, what: string, now: Date): void {
  if (cert.notBefore > now) throw new HallmarkError('STATION_PACKAGE_INVALID', `${what} is not valid before ${cert.notBefore.toISOString()}`);
  if (cert.notAfter <= now) throw new HallmarkError('STATION_EXPIRED', `${what} expired at ${cert.notAfter.toISOString()}`);
}

/** Parses PEM certificates (every block must be a CERTIFICATE). */
export function parseCertificatesPem(textOrBytes: string | Buffer, file: string, maxBytes: number): ParsedCertificate[] {
  const text = typeof textOrBytes === 'string' ? textOrBytes : textOrBytes.toString('utf8');
  if (text.length > maxBytes) throw invalid(`${file} is over the ${maxBytes}-byte limit`);
  let blocks;
  try {
    blocks = decodePemBlocks(text, SIZE_LIMITS.certificate);
  } catch (err) {
    throw invalid(`${file}: ${(err as Error).message}`, err);
  }
  return blocks.map((b, i) => {
    if (b.label !== 'CERTIFICATE') throw invalid(`${file}: block ${i + 1} is a ${b.label}, not a CERTIFICATE`);
    try {
      return parseCertificate(b.der);
    } catch (err) {
      throw invalid(`${file}: certificate ${i + 1} cannot be parsed: ${(err as Error).message}`, err);
    }
  });
}

/**
 * Checks a whole package: the manifest, the station certificate (see checkStationCertificate) and its
 * chain (each certificate signed by the next, the last self-signed, CA flags and path lengths, validity).
 */
export function checkStationPackage(parts: { manifest: string | Buffer | StationManifest; certificate: string | Buffer; chain: string | Buffer }, options: PackageCheckOptions = {}): StationPackage {
  const manifest = parseStationManifest(parts.manifest);
  const now = options.now ?? new Date();
  const checkValidity = options.checkValidity ?? true;

  const certs = parseCertificatesPem(parts.certificate, 'station.pem', PACKAGE_LIMITS.certificateBytes);
  if (certs.length !== 1) throw invalid(`station.pem must hold exactly one certificate, not ${certs.length}`);
  const certificate = certs[0]!;
  const facts = checkStationCertificate(certificate, encodeSubjectBase(manifest.deviceSubjectBase));

  const chain = parseCertificatesPem(parts.chain, 'chain.pem', PACKAGE_LIMITS.chainBytes);
  if (chain.length > PACKAGE_LIMITS.maxChainLength) throw invalid(`chain.pem holds ${chain.length} certificates, over the limit of ${PACKAGE_LIMITS.maxChainLength}`);
  const root = chain[chain.length - 1]!;
  const path = [certificate, ...chain];
  for (let i = 0; i < path.length - 1; i++) {
    const what = i === 0 ? 'station.pem' : `chain.pem certificate ${i}`;
    try {
      verifyIssuedBy(path[i]!, path[i + 1]!);
    } catch (err) {
      throw invalid(`${what} (${safeNameText(path[i]!.subject)}) is not signed by ${i + 1 === path.length - 1 ? 'the root' : `chain.pem certificate ${i + 1}`} (${safeNameText(path[i + 1]!.subject)}): ${(err as Error).message}`, err);
    }
    // Below path[i + 1] in a device's path: the station certificate and the i certificates between.
    checkCaInChain(path[i + 1]!, `certificate ${i + 1}`, i + 1);
  }
  try {
    verifyIssuedBy(root, root);
  } catch (err) {
    throw invalid(`chain.pem must end with the self-signed root, but its last certificate (${safeNameText(root.subject)}) is not self-signed`, err);
  }
  if (certificate.subjectPublicKeyInfo.equals(root.subjectPublicKeyInfo)) throw invalid('station.pem carries the root key itself');
  if (options.trustedRoots && !options.trustedRoots.some((r) => r.equals(root.der))) {
    throw invalid(`chain.pem ends with the root ${safeNameText(root.subject)} (SHA-256 ${createHash('sha256').update(root.der).digest('hex')}), which is not a trusted root here`);
  }

  const validUntil = new Date(manifest.validUntil);
  // station.pem should end at validUntil; a certificate that ends earlier only shortens the window.
  if (certificate.notAfter.getTime() > validUntil.getTime() + 86_400_000) {
    throw invalid(`station.pem is valid until ${certificate.notAfter.toISOString()}, past the package's validUntil ${manifest.validUntil}: the certificate and station.json do not belong together`);
  }
  if (checkValidity) {
    for (let i = 0; i < path.length; i++) checkTime(path[i]!, i === 0 ? 'station.pem' : `chain.pem certificate ${i}`, now);
    if (validUntil <= now) throw new HallmarkError('STATION_EXPIRED', `the station package was valid until ${manifest.validUntil}`);
  }
  // The root signed off this manifest (quota, validity, devices) when the certificate carries its digest;
  // an edited station.json — a raised quota, say — no longer matches. Packages made before the binding
  // (no digest in station.pem) are accepted as they were, and say so (manifestBound).
  const bound = certificate.extensions.get(EXT.stationManifest);
  if (bound) {
    let digest: Buffer;
    try { digest = decodeStationManifestDigest(bound.value); } catch (err) { throw invalid(`station.pem's station manifest digest cannot be read: ${(err as Error).message}`, err); }
    if (!digest.equals(stationManifestDigest(manifest))) {
      throw invalid('station.json is not the manifest the root signed off for station.pem (its quota, validity, batch or device list was changed): ask HQ for the package again');
    }
  } else if (options.requireBoundManifest) {
    throw invalid('station.pem does not carry the digest of station.json (a package made before Hallmark bound the two): ask HQ for a new package');
  }
  const signsUntil = new Date(Math.min(validUntil.getTime(), certificate.notAfter.getTime()));
  const devicesByKey = new Map<string, StationDevice>();
  for (const d of manifest.devices ?? []) devicesByKey.set(d.publicKeySha256, d);
  return { manifest, certificate, chain, root, subjectBase: facts.subjectBase, keyId: facts.keyId, keyAlgorithm: facts.keyAlgorithm, signsUntil, devicesByKey, manifestBound: !!bound };
}

async function readLimited(path: string, limit: number, name: string): Promise<Buffer> {
  try {
    return await readFileWithin(path, limit);
  } catch (err) {
    if (err instanceof FileOverLimit) throw invalid(`${name} is ${err.size} bytes, over the ${limit}-byte limit`);
    const code = (err as NodeJS.ErrnoException).code;
    throw invalid(code === 'ENOENT' ? `the package has no ${name} (${path})${name === PACKAGE_FILES.certificate ? ': has the ceremony signed it and `hallmark station install` completed the package?' : ''}` : `cannot read ${path}: ${code ?? (err as Error).message}`);
  }
}

/** Reads and checks PACKAGE/station.json, station.pem and chain.pem (size limits before reading). */
export async function readStationPackage(dir: string, options: PackageCheckOptions = {}): Promise<StationPackage> {
  let s;
  try { s = await stat(dir); } catch { throw invalid(`no station package at ${dir}`); }
  if (!s.isDirectory()) throw invalid(`${dir} is not a directory (a station package is a directory holding ${Object.values(PACKAGE_FILES).join(', ')})`);
  const manifest = await readLimited(join(dir, PACKAGE_FILES.manifest), PACKAGE_LIMITS.manifestBytes, PACKAGE_FILES.manifest);
  const certificate = await readLimited(join(dir, PACKAGE_FILES.certificate), PACKAGE_LIMITS.certificateBytes, PACKAGE_FILES.certificate);
  const chain = await readLimited(join(dir, PACKAGE_FILES.chain), PACKAGE_LIMITS.chainBytes, PACKAGE_FILES.chain);
  return checkStationPackage({ manifest, certificate, chain }, options);
}

async function writeDurably(path: string, data: string | Buffer): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, data, { mode: 0o644 });
  const h = await openFile(tmp, 'r+');
  try { await h.sync(); } finally { await h.close(); }
  await rename(tmp, path);
}

/**
 * Writes a package directory (for the online side and tests). The certificate and chain are DER; the
 * chain is written issuer first. Files are written through a temporary name and renamed, so a reader
 * never sees half a package file. Checks nothing beyond the manifest: call readStationPackage after.
 */
export async function writeStationPackage(dir: string, pkg: { manifest: StationManifest; certificate?: Buffer; chain?: readonly Buffer[] }): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o755 });
  await writeDurably(join(dir, PACKAGE_FILES.manifest), serializeManifest(pkg.manifest));
  if (pkg.chain) await writeDurably(join(dir, PACKAGE_FILES.chain), pkg.chain.map((c) => encodePem('CERTIFICATE', c)).join(''));
  if (pkg.certificate) await writeDurably(join(dir, PACKAGE_FILES.certificate), encodePem('CERTIFICATE', pkg.certificate));
}

/**
 * What the root ceremony binds into the station's sub-CA certificate (EXT.stationManifest): the SHA-256
 * of the manifest in its one serialised form, so reformatting the file changes nothing but any changed
 * field — quota, validity, batch, device list — breaks the match.
 */
export function stationManifestDigest(manifest: StationManifest): Buffer {
  return createHash('sha256').update(serializeManifest(manifest), 'utf8').digest();
}

/** The UDID of a device key when the batch has no device list: hex SHA-256 of the SPKI DER (as udidOfKey in the registry). */
export const keySha256 = (spki: Buffer): string => createHash('sha256').update(spki).digest('hex');
