// X.509 v3 extensions, encoded straight to DER (see der.ts for why).

import { createHash } from 'node:crypto';
import { isIP } from 'node:net';
import { HallmarkError } from '../errors.js';
import { NULL, TAG, TRUE, bitString, children, content, ctx, decodeOid, octetString, oid, readWhole, seq, smallInteger, tlv } from './der.js';

export const EXT = {
  subjectKeyIdentifier: '2.5.29.14',
  keyUsage: '2.5.29.15',
  subjectAltName: '2.5.29.17',
  basicConstraints: '2.5.29.19',
  nameConstraints: '2.5.29.30',
  crlDistributionPoints: '2.5.29.31',
  authorityKeyIdentifier: '2.5.29.35',
  extKeyUsage: '2.5.29.37',
  authorityInfoAccess: '1.3.6.1.5.5.7.1.1',
  ocspNoCheck: '1.3.6.1.5.5.7.48.1.5',
  /**
   * Hallmark's own, non-critical: the SHA-256 of a factory station's package manifest (station.json),
   * written into the station's sub-CA certificate by the root ceremony, so the offline station and HQ
   * can tell the quota, validity and device list the root signed off from an edited copy. Hallmark has
   * no enterprise number: the OID is a UUID arc (ITU-T X.667, 2.25), minted once for this purpose.
   */
  stationManifest: '2.25.319757526690763988780952622331811686205',
} as const;

export const EKU = {
  serverAuth: '1.3.6.1.5.5.7.3.1',
  clientAuth: '1.3.6.1.5.5.7.3.2',
  ocspSigning: '1.3.6.1.5.5.7.3.9',
} as const;

export const KEY_USAGE_BITS = ['digitalSignature', 'nonRepudiation', 'keyEncipherment', 'dataEncipherment', 'keyAgreement', 'keyCertSign', 'cRLSign', 'encipherOnly', 'decipherOnly'] as const;
export type KeyUsage = (typeof KEY_USAGE_BITS)[number];

export function extension(extOid: string, critical: boolean, value: Buffer): Buffer {
  return critical ? seq(oid(extOid), TRUE, octetString(value)) : seq(oid(extOid), octetString(value));
}

/** RFC 7093 §2 method 1: leftmost 160 bits of SHA-256 over the subjectPublicKey BIT STRING value. */
export function keyIdentifier(spki: Buffer): Buffer {
  const outer = readWhole(spki, TAG.SEQUENCE, 'SubjectPublicKeyInfo');
  const [, keyBits] = children(spki, outer);
  if (!keyBits || keyBits.tag !== TAG.BIT_STRING) throw new HallmarkError('BAD_DER', 'SubjectPublicKeyInfo without a BIT STRING');
  return createHash('sha256').update(spki.subarray(keyBits.contentStart + 1, keyBits.end)).digest().subarray(0, 20);
}

export const basicConstraints = (ca: boolean, pathLen?: number): Buffer =>
  extension(EXT.basicConstraints, true, ca ? seq(TRUE, ...(pathLen === undefined ? [] : [smallInteger(pathLen)])) : seq());

export function keyUsage(usages: readonly KeyUsage[]): Buffer {
  // DER named bit list: bit 0 is the top bit of the first byte; trailing zero bits are dropped and
  // their count goes into the "unused bits" byte.
  let highest = -1;
  const body = Buffer.alloc(2);
  for (const u of usages) {
    const i = KEY_USAGE_BITS.indexOf(u);
    body[i >> 3]! |= 0x80 >> (i & 7);
    highest = Math.max(highest, i);
  }
  if (highest < 0) throw new RangeError('keyUsage needs at least one usage');
  const used = body.subarray(0, (highest >> 3) + 1);
  return extension(EXT.keyUsage, true, bitString(used, 7 - (highest & 7)));
}

export const extKeyUsage = (oids: readonly string[]): Buffer => extension(EXT.extKeyUsage, false, seq(...oids.map(oid)));
export const subjectKeyIdentifier = (ski: Buffer): Buffer => extension(EXT.subjectKeyIdentifier, false, octetString(ski));
export const authorityKeyIdentifier = (ski: Buffer): Buffer => extension(EXT.authorityKeyIdentifier, false, seq(ctx(0, ski, false)));
export const ocspNoCheck = (): Buffer => extension(EXT.ocspNoCheck, false, NULL);

export interface AltNames {
  readonly dns?: readonly string[];
  readonly ip?: readonly string[];
  readonly uri?: readonly string[];
  readonly email?: readonly string[];
}

const DNS_NAME = /^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/i;

function ipBytes(ip: string): Buffer {
  // A zone id (fe80::1%eth0) has no place in a certificate; refuse it rather than drop it silently.
  const v = ip.includes('%') ? 0 : isIP(ip);
  if (v === 4) return Buffer.from(ip.split('.').map(Number));
  if (v === 6) {
    // An embedded IPv4 tail (::ffff:192.0.2.1) is the last two groups.
    const text = ip.replace(/(\d+)\.(\d+)\.(\d+)\.(\d+)$/, (_, a, b, c, d) => `${((+a << 8) | +b).toString(16)}:${((+c << 8) | +d).toString(16)}`);
    const [head, tail] = text.includes('::') ? text.split('::') as [string, string] : [text, undefined];
    const h = head ? head.split(':') : [];
    const t = tail ? tail.split(':') : [];
    const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
    const out = Buffer.alloc(16);
    groups.forEach((g, i) => out.writeUInt16BE(parseInt(g, 16), i * 2));
    return out;
  }
  throw new HallmarkError('BAD_REQUEST', `not an IP address: ${JSON.stringify(ip)}`);
}

export function generalNames(names: AltNames): Buffer[] {
  const out: Buffer[] = [];
  for (const e of names.email ?? []) {
    if (!/^[^@\s]+@[^@\s]+$/.test(e) || !/^[\x21-\x7e]+$/.test(e)) throw new HallmarkError('BAD_REQUEST', `not an e-mail address: ${JSON.stringify(e)}`);
    out.push(tlv(0x81, Buffer.from(e, 'ascii')));
  }
  for (const d of names.dns ?? []) {
    if (d.length > 253 || !DNS_NAME.test(d)) throw new HallmarkError('BAD_REQUEST', `not a DNS name: ${JSON.stringify(d)}`);
    out.push(tlv(0x82, Buffer.from(d.toLowerCase(), 'ascii')));
  }
  for (const u of names.uri ?? []) {
    if (!/^[a-z][a-z0-9+.-]*:[\x21-\x7e]+$/i.test(u)) throw new HallmarkError('BAD_REQUEST', `not a URI: ${JSON.stringify(u)}`);
    out.push(tlv(0x86, Buffer.from(u, 'ascii')));
  }
  for (const ip of names.ip ?? []) out.push(tlv(0x87, ipBytes(ip)));
  return out;
}

export function subjectAltName(names: AltNames, critical = false): Buffer {
  const gns = generalNames(names);
  if (gns.length === 0) throw new HallmarkError('BAD_REQUEST', 'subjectAltName needs at least one name');
  return extension(EXT.subjectAltName, critical, seq(...gns));
}

/** Permitted subtrees only (DNS names, e-mail domains, URIs' hosts, and directory names). */
export function nameConstraints(permitted: { dns?: readonly string[]; directoryNames?: readonly Buffer[] }): Buffer {
  const subtrees: Buffer[] = [];
  for (const d of permitted.dns ?? []) subtrees.push(seq(tlv(0x82, Buffer.from(d.replace(/^\./, ''), 'ascii'))));
  for (const n of permitted.directoryNames ?? []) subtrees.push(seq(ctx(4, n)));
  if (subtrees.length === 0) throw new HallmarkError('BAD_REQUEST', 'name constraints need at least one permitted subtree');
  return extension(EXT.nameConstraints, true, seq(ctx(0, Buffer.concat(subtrees))));
}

export const crlDistributionPoints = (urls: readonly string[]): Buffer =>
  extension(EXT.crlDistributionPoints, false, seq(...urls.map((u) => seq(ctx(0, ctx(0, tlv(0x86, Buffer.from(u, 'ascii')))))))); // DistributionPoint{ fullName [0] { [0] GeneralNames } }

export const authorityInfoAccess = (access: { ocsp?: readonly string[]; caIssuers?: readonly string[] }): Buffer =>
  extension(EXT.authorityInfoAccess, false, seq(
    ...(access.ocsp ?? []).map((u) => seq(oid('1.3.6.1.5.5.7.48.1'), tlv(0x86, Buffer.from(u, 'ascii')))),
    ...(access.caIssuers ?? []).map((u) => seq(oid('1.3.6.1.5.5.7.48.2'), tlv(0x86, Buffer.from(u, 'ascii')))),
  ));

// ---------------------------------------------------------------- reading back

/** Decodes a KeyUsage extension value into usage names. */
export function decodeKeyUsage(value: Buffer): KeyUsage[] {
  const t = readWhole(value, TAG.BIT_STRING, 'KeyUsage');
  const body = content(value, t);
  const out: KeyUsage[] = [];
  for (let i = 0; i < KEY_USAGE_BITS.length; i++) {
    const byte = body[1 + (i >> 3)];
    if (byte !== undefined && byte & (0x80 >> (i & 7))) out.push(KEY_USAGE_BITS[i]!);
  }
  return out;
}

export function decodeBasicConstraints(value: Buffer): { ca: boolean; pathLen?: number } {
  const t = readWhole(value, TAG.SEQUENCE, 'BasicConstraints');
  const items = children(value, t);
  let ca = false;
  let pathLen: number | undefined;
  for (const item of items) {
    if (item.tag === TAG.BOOLEAN) ca = value[item.contentStart] === 0xff;
    else if (item.tag === TAG.INTEGER) pathLen = content(value, item).reduce((n, b) => n * 256 + b, 0);
  }
  return pathLen === undefined ? { ca } : { ca, pathLen };
}

export function decodeOidSequence(value: Buffer, what: string): string[] {
  const t = readWhole(value, TAG.SEQUENCE, what);
  return children(value, t).map((c) => {
    if (c.tag !== TAG.OID) throw new HallmarkError('BAD_DER', `${what}: expected OID`);
    return decodeOidFrom(value, c);
  });
}

const decodeOidFrom = (buf: Buffer, t: { contentStart: number; end: number }): string => decodeOid(buf.subarray(t.contentStart, t.end));

/** The key identifier inside an AuthorityKeyIdentifier value, if present. */
export function decodeAuthorityKeyId(value: Buffer): Buffer | undefined {
  const t = readWhole(value, TAG.SEQUENCE, 'AuthorityKeyIdentifier');
  const first = children(value, t)[0];
  return first && first.tag === 0x80 ? content(value, first) : undefined;
}

/** The station manifest extension's value: OCTET STRING (32 bytes, SHA-256). */
export function stationManifestExtension(sha256: Buffer): Buffer {
  if (sha256.length !== 32) throw new HallmarkError('BAD_REQUEST', 'a station manifest digest is 32 bytes (SHA-256)');
  return extension(EXT.stationManifest, false, octetString(sha256));
}

export function decodeStationManifestDigest(value: Buffer): Buffer {
  const digest = content(value, readWhole(value, TAG.OCTET_STRING, 'station manifest digest'));
  if (digest.length !== 32) throw new HallmarkError('BAD_DER', `the station manifest digest is ${digest.length} bytes, not 32`);
  return digest;
}

export function decodeSubjectKeyId(value: Buffer): Buffer {
  return content(value, readWhole(value, TAG.OCTET_STRING, 'SubjectKeyIdentifier'));
}

