// Certificate Revocation Lists (RFC 5280 §5): a fast DER encoder for full and delta CRLs, and a
// size-limited reader for tests and tools.
//
// Why the revoked-certificate list is written by hand into one buffer: a CRL of 1,000,000 entries is
// some 4,000,000 TLVs. A general ASN.1 object model (asn1js, @peculiar/asn1-schema) allocates an object
// per field plus a Buffer per TLV and takes seconds for that; even der.ts's tlv() per element costs
// 3-4 allocations per entry. Here RevokedListWriter writes each entry straight into one growing buffer:
// the serial decoded from its hex, the revocation time copied digit by digit from the store's ISO text
// (no Date per entry), the reason-code extension of each reason encoded once. Entries can be streamed
// into it from the store page by page, so a million rows are never held as objects (measured:
// bench/crl.bench.ts, docs/benchmarks.md).
// The few fixed parts around the list (extensions, TBS header) use der.ts as usual.

import { verify as cryptoVerify } from 'node:crypto';
import { HallmarkError } from '../../errors.js';
import { SCHEME_BY_OID, publicKeyFromSpki, type SignatureScheme } from '../../pki/algorithms.js';
import { TAG, bitString, children, content, ctx, decodeOid, decodeTime, readTlv, readWhole, seq, smallInteger, time, tlv, whole, type Tlv } from '../../pki/der.js';
import { EXT, authorityKeyIdentifier, decodeAuthorityKeyId, extension } from '../../pki/extensions.js';
import { SIZE_LIMITS } from '../../pki/pem.js';
import { REVOCATION_REASONS, type RevocationReason } from '../../authority/revocation.js';

export const CRL_EXT = {
  cRLNumber: '2.5.29.20',
  reasonCode: '2.5.29.21',
  deltaCRLIndicator: '2.5.29.27',
  issuingDistributionPoint: '2.5.29.28',
  freshestCRL: '2.5.29.46',
  authorityKeyIdentifier: EXT.authorityKeyIdentifier,
} as const;

/** Reason names by RFC 5280 §5.3.1 code, including removeFromCRL (8), which only a delta CRL carries. */
export const REASON_BY_CODE: ReadonlyMap<number, string> = new Map<number, string>([
  ...Object.entries(REVOCATION_REASONS).map(([name, code]) => [code, name] as [number, string]),
  [8, 'removeFromCRL'],
]);

export interface CrlEntry {
  /** Canonical lowercase hex of the serial's magnitude (as the store keeps it). */
  readonly serialHex: string;
  readonly revokedAt: Date;
  /** RFC 5280 reason name; absent, null or 'unspecified' -> no reasonCode extension (§5.3.1). */
  readonly reason?: RevocationReason | string | null;
}

export interface CrlSpec {
  /** DER Name of the issuing CA, exactly its certificate's subject. */
  readonly issuer: Buffer;
  /** The CA's subject key identifier (goes into authorityKeyIdentifier). */
  readonly issuerKeyId: Buffer;
  readonly scheme: SignatureScheme;
  readonly thisUpdate: Date;
  readonly nextUpdate: Date;
  /** cRLNumber: one increasing sequence per CA, shared by full and delta CRLs. */
  readonly number: number;
  /** Makes this a delta CRL: the number of the full CRL it builds on (critical deltaCRLIndicator). */
  readonly deltaBase?: number;
  /** Full CRLs: where the delta CRL is (freshestCRL, RFC 5280 §5.2.6). */
  readonly freshestCrlUrl?: string;
  /** The revoked certificates: a list, or a RevokedListWriter they were streamed into (finished here). */
  readonly entries: readonly CrlEntry[] | RevokedListWriter;
}

const VERSION_2 = Buffer.from([0x02, 0x01, 0x01]);

function lengthOfHeader(length: number): number {
  return length < 0x80 ? 2 : length < 0x100 ? 3 : length < 0x10000 ? 4 : length < 0x1000000 ? 5 : 6;
}

function writeHeader(out: Buffer, at: number, tag: number, length: number): number {
  const h = lengthOfHeader(length);
  out[at] = tag;
  if (h === 2) {
    out[at + 1] = length;
  } else {
    out[at + 1] = 0x80 | (h - 2);
    for (let i = at + h - 1, v = length; i >= at + 2; i--, v = Math.floor(v / 256)) out[i] = v & 0xff;
  }
  return at + h;
}

function reasonCode(reason: CrlEntry['reason']): number {
  if (reason === undefined || reason === null || reason === 'unspecified') return 0;
  const code = (REVOCATION_REASONS as Record<string, number>)[reason] ?? (reason === 'removeFromCRL' ? 8 : undefined);
  if (code === undefined) throw new HallmarkError('BAD_REQUEST', `unknown revocation reason ${JSON.stringify(reason)}`);
  return code;
}

/** The crlEntryExtensions of one reason: SEQUENCE { reasonCode Extension } (non-critical, ENUMERATED). */
function entryExtensionsFor(code: number): Buffer {
  return seq(extension(CRL_EXT.reasonCode, false, tlv(TAG.ENUMERATED, Buffer.from([code]))));
}

/** Room kept in front of the list for its SEQUENCE header (at most 6 bytes: tag, 0x84, 4 length bytes). */
const LIST_HEADROOM = 6;
/** Bytes of one entry with a 16-byte serial, a UTCTime and a reasonCode: the initial size estimate. */
const ENTRY_ESTIMATE = 49;

/**
 * revokedCertificates written entry by entry into one growing buffer (SEQUENCE OF SEQUENCE { serial,
 * revocationDate, crlEntryExtensions? }). Nothing is allocated per entry: the serial's hex is decoded
 * into a scratch buffer and copied, the time is written digit by digit (from the store's ISO 8601 text
 * without a Date, or from a Date), and the reasonCode extension of each reason is encoded once. So a
 * caller can stream a million rows from the store into it without holding them (CrlPublisher does).
 */
export class RevokedListWriter {
  #buf: Buffer;
  #at = LIST_HEADROOM;
  #count = 0;
  #finished: Buffer | undefined;
  readonly #extensions = new Map<number, Buffer>();
  readonly #serial = Buffer.alloc(21);

  /** `expected`: entries expected (sizes the first buffer; it grows as needed). */
  constructor(expected = 64) {
    this.#buf = Buffer.allocUnsafe(LIST_HEADROOM + Math.max(1, expected) * ENTRY_ESTIMATE);
  }

  /** Entries added so far. */
  get count(): number { return this.#count; }

  /**
   * Adds one entry. `revokedAt`: a Date, or an ISO 8601 UTC text as the store keeps it
   * (YYYY-MM-DDTHH:MM:SS[.fff]Z; anything else is read with new Date()). Throws BAD_REQUEST for a bad
   * serial, time or reason (before anything is signed).
   */
  add(serialHex: string, revokedAt: Date | string, reason?: CrlEntry['reason']): void {
    if (this.#finished) throw new Error('RevokedListWriter: add() after finish()');
    // The serial's magnitude: hex -> bytes, leading zero bytes dropped, 0x00 prepended when the top bit is set.
    const hex = serialHex.length % 2 ? '0' + serialHex : serialHex;
    const sb = this.#serial;
    const n = hex.length <= 42 ? sb.write(hex, 0, 'hex') : 0;
    if (n * 2 !== hex.length || n === 0 || n > 20) throw new HallmarkError('BAD_REQUEST', `not a serial number: ${JSON.stringify(serialHex)}`);
    let z = 0;
    while (z < n - 1 && sb[z] === 0) z++;
    const serialLength = n - z;
    const pad = sb[z]! & 0x80 ? 1 : 0;
    const integerLength = serialLength + pad;

    const iso = typeof revokedAt === 'string' ? isoDigits(revokedAt) : undefined;
    let year: number;
    let date: Date | undefined;
    let fallback: Buffer | undefined;
    if (iso !== undefined) {
      year = iso;
    } else {
      date = typeof revokedAt === 'string' ? new Date(revokedAt) : revokedAt;
      if (!(date instanceof Date) || !Number.isFinite(date.getTime())) throw new HallmarkError('BAD_REQUEST', `serial ${serialHex}: bad revocation time`);
      year = date.getUTCFullYear();
      if (year < 0 || year > 9999) fallback = time(date);
    }
    const timeLength = fallback ? fallback.length : year >= 1950 && year < 2050 ? 15 : 17;

    const code = reasonCode(reason);
    let ext: Buffer | undefined;
    if (code !== 0) {
      ext = this.#extensions.get(code);
      if (!ext) this.#extensions.set(code, (ext = entryExtensionsFor(code)));
    }
    const len = 2 + integerLength + timeLength + (ext ? ext.length : 0);
    this.#reserve(lengthOfHeader(len) + len);
    const out = this.#buf;
    let at = writeHeader(out, this.#at, TAG.SEQUENCE, len);
    out[at++] = TAG.INTEGER;
    out[at++] = integerLength;
    if (pad) out[at++] = 0;
    sb.copy(out, at, z, n);
    at += serialLength;
    if (fallback) {
      fallback.copy(out, at);
      at += fallback.length;
    } else if (date) {
      // The same digits as der.ts time(), written in place.
      if (timeLength === 15) {
        out[at++] = TAG.UTC_TIME;
        out[at++] = 13;
        at = digits2(out, at, year % 100);
      } else {
        out[at++] = TAG.GENERALIZED_TIME;
        out[at++] = 15;
        at = digits2(out, digits2(out, at, Math.floor(year / 100)), year % 100);
      }
      at = digits2(out, at, date.getUTCMonth() + 1);
      at = digits2(out, at, date.getUTCDate());
      at = digits2(out, at, date.getUTCHours());
      at = digits2(out, at, date.getUTCMinutes());
      at = digits2(out, at, date.getUTCSeconds());
      out[at++] = 0x5a; // Z
    } else {
      // The ISO text is YYYY-MM-DDTHH:MM:SS...: its digits are copied as they are (seconds precision, Z).
      const s = revokedAt as string;
      if (timeLength === 15) {
        out[at++] = TAG.UTC_TIME;
        out[at++] = 13;
        out[at++] = s.charCodeAt(2);
        out[at++] = s.charCodeAt(3);
      } else {
        out[at++] = TAG.GENERALIZED_TIME;
        out[at++] = 15;
        for (let k = 0; k < 4; k++) out[at++] = s.charCodeAt(k);
      }
      for (const k of ISO_DIGITS_AFTER_YEAR) out[at++] = s.charCodeAt(k);
      out[at++] = 0x5a; // Z
    }
    if (ext) {
      ext.copy(out, at);
      at += ext.length;
    }
    this.#at = at;
    this.#count++;
  }

  /** The encoded revokedCertificates (a view into the writer's buffer), or an empty buffer for no entries. */
  finish(): Buffer {
    if (this.#finished) return this.#finished;
    if (this.#count === 0) return (this.#finished = Buffer.alloc(0)); // RFC 5280 §5.1.2.6: absent when nothing is revoked
    const length = this.#at - LIST_HEADROOM;
    const start = LIST_HEADROOM - lengthOfHeader(length);
    writeHeader(this.#buf, start, TAG.SEQUENCE, length);
    return (this.#finished = this.#buf.subarray(start, this.#at));
  }

  #reserve(bytes: number): void {
    if (this.#at + bytes <= this.#buf.length) return;
    const grown = Buffer.allocUnsafe(Math.max(this.#at + bytes, Math.ceil(this.#buf.length * 1.5)));
    this.#buf.copy(grown, 0, 0, this.#at);
    this.#buf = grown;
  }
}

function digits2(out: Buffer, at: number, n: number): number {
  out[at] = 0x30 + Math.floor(n / 10);
  out[at + 1] = 0x30 + (n % 10);
  return at + 2;
}

/** Offsets of MM, DD, HH, MM, SS in YYYY-MM-DDTHH:MM:SS. */
const ISO_DIGITS_AFTER_YEAR = [5, 6, 8, 9, 11, 12, 14, 15, 17, 18] as const;
const DAYS_IN_MONTH = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/** The year of an ISO 8601 UTC text YYYY-MM-DDTHH:MM:SS[.f…]Z with valid fields, or undefined when it is not one. */
function isoDigits(s: string): number | undefined {
  const L = s.length;
  if (L < 20 || s.charCodeAt(L - 1) !== 0x5a || s.charCodeAt(4) !== 0x2d || s.charCodeAt(7) !== 0x2d || s.charCodeAt(10) !== 0x54 || s.charCodeAt(13) !== 0x3a || s.charCodeAt(16) !== 0x3a) return undefined;
  if (L > 20 && s.charCodeAt(19) !== 0x2e) return undefined;
  const d = (k: number): number => {
    const c = s.charCodeAt(k) - 0x30;
    return c >= 0 && c <= 9 ? c : NaN;
  };
  for (let k = 20; k < L - 1; k++) if (Number.isNaN(d(k))) return undefined;
  const year = d(0) * 1000 + d(1) * 100 + d(2) * 10 + d(3);
  const month = d(5) * 10 + d(6);
  const day = d(8) * 10 + d(9);
  const hour = d(11) * 10 + d(12);
  const minute = d(14) * 10 + d(15);
  const second = d(17) * 10 + d(18);
  // NaN fails every comparison below.
  if (!(year >= 0 && month >= 1 && month <= 12 && day >= 1 && day <= DAYS_IN_MONTH[month]! && hour <= 23 && minute <= 59 && second <= 59)) return undefined;
  return year;
}

/** revokedCertificates (SEQUENCE OF SEQUENCE { serial, revocationDate, crlEntryExtensions? }), or an empty buffer for no entries. */
export function encodeRevokedCertificates(entries: readonly CrlEntry[]): Buffer {
  const writer = new RevokedListWriter(entries.length);
  for (const e of entries) writer.add(e.serialHex, e.revokedAt, e.reason);
  return writer.finish();
}

/** The TBSCertList (RFC 5280 §5.1.2), version 2. */
export function encodeTbsCertList(spec: CrlSpec): Buffer {
  if (!Number.isInteger(spec.number) || spec.number < 0) throw new RangeError('CRL number must be a non-negative integer');
  if (spec.nextUpdate <= spec.thisUpdate) throw new RangeError('nextUpdate must be after thisUpdate');
  const extensions = [
    authorityKeyIdentifier(spec.issuerKeyId),
    extension(CRL_EXT.cRLNumber, false, smallInteger(spec.number)),
  ];
  if (spec.deltaBase !== undefined) {
    if (!Number.isInteger(spec.deltaBase) || spec.deltaBase < 0 || spec.deltaBase >= spec.number) throw new RangeError('a delta CRL builds on an earlier CRL number');
    extensions.push(extension(CRL_EXT.deltaCRLIndicator, true, smallInteger(spec.deltaBase)));
  }
  if (spec.freshestCrlUrl !== undefined) {
    if (!/^[a-z][a-z0-9+.-]*:[\x21-\x7e]+$/i.test(spec.freshestCrlUrl)) throw new HallmarkError('BAD_REQUEST', `not a URI: ${JSON.stringify(spec.freshestCrlUrl)}`);
    // CRLDistributionPoints syntax: DistributionPoint { distributionPoint [0] { fullName [0] { uniformResourceIdentifier } } }
    extensions.push(extension(CRL_EXT.freshestCRL, false, seq(seq(ctx(0, ctx(0, tlv(0x86, Buffer.from(spec.freshestCrlUrl, 'ascii'))))))));
  }
  return seq(
    VERSION_2,
    spec.scheme.algorithmIdentifier,
    spec.issuer,
    time(spec.thisUpdate),
    time(spec.nextUpdate),
    spec.entries instanceof RevokedListWriter ? spec.entries.finish() : encodeRevokedCertificates(spec.entries),
    ctx(0, seq(...extensions)),
  );
}

/** Builds and signs a CRL; returns the DER CertificateList. `sign` signs the TBS bytes with the CA key. */
export async function encodeCrl(spec: CrlSpec, sign: (tbs: Buffer) => Promise<Buffer>): Promise<Buffer> {
  const tbs = encodeTbsCertList(spec);
  const signature = await sign(tbs);
  return seq(tbs, spec.scheme.algorithmIdentifier, bitString(signature));
}

// ---------------------------------------------------------------- reading

export interface ParsedCrlEntry {
  readonly serialHex: string;
  readonly revokedAt: Date;
  /** Reason name; 'unspecified' when the entry has no reasonCode. */
  readonly reason: string;
}

export interface CrlExtension { readonly critical: boolean; readonly value: Buffer }

/** A parsed CRL; buffers are views into the DER. */
export interface ParsedCrl {
  readonly der: Buffer;
  readonly tbs: Buffer;
  readonly version: number;
  readonly signatureAlgorithm: Buffer;
  readonly signatureAlgorithmOid: string;
  readonly issuer: Buffer;
  readonly thisUpdate: Date;
  readonly nextUpdate?: Date;
  readonly entries: readonly ParsedCrlEntry[];
  readonly extensions: ReadonlyMap<string, CrlExtension>;
  readonly number?: number;
  /** Set on delta CRLs: the base CRL number (deltaCRLIndicator). */
  readonly deltaBase?: number;
  readonly authorityKeyId?: Buffer;
  /** freshestCRL URIs (full CRLs pointing to their delta). */
  readonly freshestCrlUrls: readonly string[];
  readonly signature: Buffer;
}

const bad = (what: string): HallmarkError => new HallmarkError('BAD_DER', `malformed CRL: ${what}`);

/** A non-negative INTEGER that fits a JavaScript number exactly (CRL numbers here). */
function readCrlNumber(value: Buffer, what: string): number {
  const t = readWhole(value, TAG.INTEGER, what);
  const body = content(value, t);
  if (body.length === 0 || body[0]! & 0x80) throw bad(`${what} is negative or empty`);
  if (body.length > 7) throw bad(`${what} is too large`);
  let n = 0;
  for (const b of body) n = n * 256 + b;
  if (!Number.isSafeInteger(n)) throw bad(`${what} is too large`);
  return n;
}

function readExtensions(der: Buffer, list: Tlv, where: string): Map<string, CrlExtension> {
  if (list.tag !== TAG.SEQUENCE) throw bad(`${where}: extensions are not a SEQUENCE`);
  const out = new Map<string, CrlExtension>();
  for (const ext of children(der, list)) {
    if (ext.tag !== TAG.SEQUENCE) throw bad(`${where}: extension is not a SEQUENCE`);
    const f = children(der, ext);
    if (f.length < 2 || f.length > 3 || f[0]!.tag !== TAG.OID) throw bad(`${where}: bad extension`);
    if (f.length === 3 && (f[1]!.tag !== TAG.BOOLEAN || f[1]!.end - f[1]!.contentStart !== 1)) throw bad(`${where}: bad critical flag`);
    const critical = f.length === 3 && der[f[1]!.contentStart] === 0xff;
    const valueT = f[f.length - 1]!;
    if (valueT.tag !== TAG.OCTET_STRING) throw bad(`${where}: extension value is not an OCTET STRING`);
    const extOid = decodeOid(content(der, f[0]!));
    if (out.has(extOid)) throw bad(`${where}: extension ${extOid} appears twice`);
    out.set(extOid, { critical, value: content(der, valueT) });
  }
  return out;
}

function decodeUris(value: Buffer, what: string): string[] {
  // CRLDistributionPoints: SEQUENCE OF DistributionPoint { [0] DistributionPointName { [0] fullName GeneralNames } }
  const urls: string[] = [];
  for (const dp of children(value, readWhole(value, TAG.SEQUENCE, what))) {
    for (const field of children(value, dp)) {
      if (field.tag !== 0xa0) continue;
      const name = readTlv(value, field.contentStart, field.end);
      if (name.tag !== 0xa0) continue;
      for (const gn of children(value, name)) if (gn.tag === 0x86) urls.push(value.toString('ascii', gn.contentStart, gn.end));
    }
  }
  return urls;
}

/** Parses a DER CertificateList. Throws INPUT_TOO_LARGE over `maxBytes`, BAD_DER for anything malformed. */
export function parseCrl(der: Buffer, maxBytes: number = SIZE_LIMITS.crl): ParsedCrl {
  if (!Buffer.isBuffer(der)) throw bad('not a byte buffer');
  if (der.length > maxBytes) throw new HallmarkError('INPUT_TOO_LARGE', `CRL is ${der.length} bytes, over the ${maxBytes}-byte limit`);
  const outer = readWhole(der, TAG.SEQUENCE, 'CertificateList');
  const parts = children(der, outer);
  if (parts.length !== 3) throw bad('a CertificateList has 3 parts');
  const [tbsT, sigAlgT, sigT] = parts as [Tlv, Tlv, Tlv];
  if (tbsT.tag !== TAG.SEQUENCE || sigAlgT.tag !== TAG.SEQUENCE || sigT.tag !== TAG.BIT_STRING) throw bad('bad CertificateList structure');
  const f = children(der, tbsT);
  let i = 0;
  let version = 1;
  if (f[0]?.tag === TAG.INTEGER) {
    const v = content(der, f[0]);
    if (v.length !== 1 || v[0] !== 1) throw bad('version must be v2');
    version = 2;
    i = 1;
  }
  const need = (ok: (t: Tlv) => boolean, what: string): Tlv => {
    const t = f[i++];
    if (!t || !ok(t)) throw bad(`missing or bad ${what}`);
    return t;
  };
  const tbsSigT = need((t) => t.tag === TAG.SEQUENCE, 'signature algorithm');
  const issuerT = need((t) => t.tag === TAG.SEQUENCE, 'issuer');
  const isTime = (t: Tlv): boolean => t.tag === TAG.UTC_TIME || t.tag === TAG.GENERALIZED_TIME;
  const thisUpdate = decodeTime(der, need(isTime, 'thisUpdate'));
  let nextUpdate: Date | undefined;
  if (f[i] && isTime(f[i]!)) nextUpdate = decodeTime(der, f[i++]!);
  const entries: ParsedCrlEntry[] = [];
  if (f[i]?.tag === TAG.SEQUENCE) {
    const list = f[i++]!;
    for (const entry of children(der, list)) {
      if (entry.tag !== TAG.SEQUENCE) throw bad('revoked certificate entry is not a SEQUENCE');
      const ef = children(der, entry);
      if (ef.length < 2 || ef.length > 3 || ef[0]!.tag !== TAG.INTEGER || !isTime(ef[1]!)) throw bad('bad revoked certificate entry');
      const serial = content(der, ef[0]!);
      if (serial.length === 0 || serial.length > 21) throw bad('bad serial number in an entry');
      let z = 0;
      while (z < serial.length - 1 && serial[z] === 0) z++;
      let reason = 'unspecified';
      if (ef[2]) {
        const exts = readExtensions(der, ef[2], 'entry');
        const rc = exts.get(CRL_EXT.reasonCode);
        if (rc) {
          const t = readWhole(rc.value, TAG.ENUMERATED, 'reasonCode');
          const body = content(rc.value, t);
          const name = body.length === 1 ? REASON_BY_CODE.get(body[0]!) : undefined;
          if (!name) throw bad(`unknown reason code ${body.toString('hex')}`);
          reason = name;
        }
      }
      entries.push({ serialHex: serial.subarray(z).toString('hex'), revokedAt: decodeTime(der, ef[1]!), reason });
    }
  }
  let extensions = new Map<string, CrlExtension>();
  if (f[i]?.tag === 0xa0) {
    if (version !== 2) throw bad('extensions need version v2');
    const wrapper = f[i++]!;
    const list = readTlv(der, wrapper.contentStart, wrapper.end);
    if (list.end !== wrapper.end) throw bad('trailing bytes after the extensions');
    extensions = readExtensions(der, list, 'CRL');
  }
  if (i !== f.length) throw bad('unexpected fields in TBSCertList');
  if (!whole(der, tbsSigT).equals(whole(der, sigAlgT))) throw bad('the two signature algorithms differ');
  const sigAlgOidT = children(der, sigAlgT)[0];
  if (!sigAlgOidT || sigAlgOidT.tag !== TAG.OID) throw bad('bad signature algorithm');
  if (sigT.end === sigT.contentStart || der[sigT.contentStart] !== 0) throw bad('signature has unused bits');
  const numberExt = extensions.get(CRL_EXT.cRLNumber);
  const deltaExt = extensions.get(CRL_EXT.deltaCRLIndicator);
  const akiExt = extensions.get(CRL_EXT.authorityKeyIdentifier);
  const freshestExt = extensions.get(CRL_EXT.freshestCRL);
  if (deltaExt && !deltaExt.critical) throw bad('deltaCRLIndicator must be critical');
  return {
    der,
    tbs: whole(der, tbsT),
    version,
    signatureAlgorithm: whole(der, sigAlgT),
    signatureAlgorithmOid: decodeOid(content(der, sigAlgOidT)),
    issuer: whole(der, issuerT),
    thisUpdate,
    nextUpdate,
    entries,
    extensions,
    number: numberExt ? readCrlNumber(numberExt.value, 'cRLNumber') : undefined,
    deltaBase: deltaExt ? readCrlNumber(deltaExt.value, 'deltaCRLIndicator') : undefined,
    authorityKeyId: akiExt ? decodeAuthorityKeyId(akiExt.value) : undefined,
    freshestCrlUrls: freshestExt ? decodeUris(freshestExt.value, 'freshestCRL') : [],
    signature: der.subarray(sigT.contentStart + 1, sigT.end),
  };
}

/** True when the CRL's signature verifies with the issuer's public key (SubjectPublicKeyInfo DER). */
export function verifyCrlSignature(crl: ParsedCrl, issuerSpki: Buffer): boolean {
  const scheme = SCHEME_BY_OID.get(crl.signatureAlgorithmOid);
  if (!scheme) throw new HallmarkError('UNSUPPORTED_ALGORITHM', `unsupported CRL signature algorithm ${crl.signatureAlgorithmOid}`);
  return cryptoVerify(scheme.hash, crl.tbs, publicKeyFromSpki(issuerSpki), crl.signature);
}
