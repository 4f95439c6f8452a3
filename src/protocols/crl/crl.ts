// Certificate Revocation Lists (RFC 5280 §5): a fast DER encoder for full and delta CRLs, and a
// size-limited reader for tests and tools.
//
// Why the revoked-certificate list is written by hand into one buffer: a CRL of 100,000 entries is
// some 400,000 TLVs. A general ASN.1 object model (asn1js, @peculiar/asn1-schema) allocates an object
// per field plus a Buffer per TLV and takes seconds for that; even der.ts's tlv() per element costs
// 3-4 allocations per entry. Here the serials are written straight into a single pre-sized buffer, and
// the revocation times and reason-code extensions (shared by every certificate of a bulk revocation:
// same instant, same reason) are encoded once and copied. 100,000 entries take tens of milliseconds.
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
  readonly entries: readonly CrlEntry[];
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

/** revokedCertificates (SEQUENCE OF SEQUENCE { serial, revocationDate, crlEntryExtensions? }), or an empty buffer for no entries. */
export function encodeRevokedCertificates(entries: readonly CrlEntry[]): Buffer {
  if (entries.length === 0) return Buffer.alloc(0); // RFC 5280 §5.1.2.6: absent when nothing is revoked
  const times = new Map<number, Buffer>();
  const extensionsByCode = new Map<number, Buffer>();
  const serials: Buffer[] = new Array(entries.length);
  const timeOf: Buffer[] = new Array(entries.length);
  const extOf: (Buffer | undefined)[] = new Array(entries.length);
  const contentLengths = new Int32Array(entries.length);
  let total = 0;
  for (let i = 0; i < entries.length; i++) {
    const e = entries[i]!;
    const hex = e.serialHex.length % 2 ? '0' + e.serialHex : e.serialHex;
    let serial = Buffer.from(hex, 'hex');
    if (serial.length * 2 !== hex.length || serial.length === 0 || serial.length > 20) {
      throw new HallmarkError('BAD_REQUEST', `not a serial number: ${JSON.stringify(e.serialHex)}`);
    }
    let z = 0;
    while (z < serial.length - 1 && serial[z] === 0) z++;
    if (z) serial = serial.subarray(z);
    serials[i] = serial;
    const ms = e.revokedAt.getTime();
    if (!Number.isFinite(ms)) throw new HallmarkError('BAD_REQUEST', `serial ${e.serialHex}: bad revocation time`);
    let t = times.get(ms);
    if (!t) times.set(ms, (t = time(e.revokedAt)));
    timeOf[i] = t;
    const code = reasonCode(e.reason);
    let ext: Buffer | undefined;
    if (code !== 0) {
      ext = extensionsByCode.get(code);
      if (!ext) extensionsByCode.set(code, (ext = entryExtensionsFor(code)));
    }
    extOf[i] = ext;
    const integerLength = serial.length + (serial[0]! & 0x80 ? 1 : 0);
    const len = 2 + integerLength + t.length + (ext ? ext.length : 0);
    contentLengths[i] = len;
    total += lengthOfHeader(len) + len;
  }
  const out = Buffer.allocUnsafe(lengthOfHeader(total) + total); // every byte is written below
  let at = writeHeader(out, 0, TAG.SEQUENCE, total);
  for (let i = 0; i < entries.length; i++) {
    at = writeHeader(out, at, TAG.SEQUENCE, contentLengths[i]!);
    const serial = serials[i]!;
    const pad = serial[0]! & 0x80 ? 1 : 0;
    out[at++] = TAG.INTEGER;
    out[at++] = serial.length + pad;
    if (pad) out[at++] = 0;
    out.set(serial, at);
    at += serial.length;
    const t = timeOf[i]!;
    out.set(t, at);
    at += t.length;
    const ext = extOf[i];
    if (ext) {
      out.set(ext, at);
      at += ext.length;
    }
  }
  return out;
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
    encodeRevokedCertificates(spec.entries),
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
