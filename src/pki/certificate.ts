// X.509 certificates: a fast TBSCertificate encoder and a zero-copy reader.

import { createHash } from 'node:crypto';
import { HallmarkError } from '../errors.js';
import { TAG, bitString, children, content, ctx, decodeOid, decodeTime, readTlv, readWhole, seq, time, unsignedInteger, whole, type Tlv } from './der.js';
import type { SignatureScheme } from './algorithms.js';

const VERSION_3 = ctx(0, Buffer.from([0x02, 0x01, 0x02]));

export interface TbsSpec {
  /** Positive serial number magnitude, big-endian. */
  readonly serial: Buffer;
  readonly scheme: SignatureScheme;
  /** DER Name of the issuer, exactly as in the issuer certificate's subject. */
  readonly issuer: Buffer;
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly subject: Buffer;
  readonly subjectPublicKeyInfo: Buffer;
  /** Each a DER Extension. */
  readonly extensions: readonly Buffer[];
}

export function encodeTbsCertificate(spec: TbsSpec): Buffer {
  return seq(
    VERSION_3,
    unsignedInteger(spec.serial),
    spec.scheme.algorithmIdentifier,
    spec.issuer,
    seq(time(spec.notBefore), time(spec.notAfter)),
    spec.subject,
    spec.subjectPublicKeyInfo,
    ctx(3, seq(...spec.extensions)),
  );
}

export function assembleCertificate(tbs: Buffer, scheme: SignatureScheme, signature: Buffer): Buffer {
  return seq(tbs, scheme.algorithmIdentifier, bitString(signature));
}

export interface CertificateExtension { readonly critical: boolean; readonly value: Buffer }

/** A parsed certificate; buffers are views into the original DER (no copies). */
export interface ParsedCertificate {
  readonly der: Buffer;
  readonly tbs: Buffer;
  readonly version: number;
  /** Serial number as lowercase hex of the DER INTEGER content (two's complement, as written). */
  readonly serialHex: string;
  readonly serialNegativeOrZero: boolean;
  readonly tbsSignatureAlgorithm: Buffer;
  readonly issuer: Buffer;
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly subject: Buffer;
  readonly subjectPublicKeyInfo: Buffer;
  readonly extensions: ReadonlyMap<string, CertificateExtension>;
  /** Extension OIDs in the order they appear (duplicates would show twice). */
  readonly extensionOrder: readonly string[];
  readonly signatureAlgorithm: Buffer;
  readonly signatureAlgorithmOid: string;
  readonly signature: Buffer;
}

export const MAX_CERTIFICATE_BYTES = 64 * 1024;

/** Parses a DER certificate; throws BAD_DER with the reason for anything malformed. */
export function parseCertificate(der: Buffer): ParsedCertificate {
  if (der.length > MAX_CERTIFICATE_BYTES) throw new HallmarkError('INPUT_TOO_LARGE', `certificate is over ${MAX_CERTIFICATE_BYTES} bytes`);
  const cert = readWhole(der, TAG.SEQUENCE, 'Certificate');
  const parts = children(der, cert);
  if (parts.length !== 3) throw new HallmarkError('BAD_DER', 'Certificate must have 3 parts');
  const [tbsT, sigAlgT, sigT] = parts as [Tlv, Tlv, Tlv];
  if (tbsT.tag !== TAG.SEQUENCE || sigAlgT.tag !== TAG.SEQUENCE || sigT.tag !== TAG.BIT_STRING) throw new HallmarkError('BAD_DER', 'Certificate: bad structure');
  const f = children(der, tbsT);
  let i = 0;
  let version = 1;
  if (f[0]?.tag === 0xa0) {
    const v = readTlv(der, f[0].contentStart, f[0].end);
    version = der[v.contentStart]! + 1;
    i = 1;
  }
  const need = (tag: number, what: string): Tlv => {
    const t = f[i++];
    if (!t || t.tag !== tag) throw new HallmarkError('BAD_DER', `Certificate: missing or bad ${what}`);
    return t;
  };
  const serialT = need(TAG.INTEGER, 'serialNumber');
  const tbsSigT = need(TAG.SEQUENCE, 'signature algorithm');
  const issuerT = need(TAG.SEQUENCE, 'issuer');
  const validityT = need(TAG.SEQUENCE, 'validity');
  const subjectT = need(TAG.SEQUENCE, 'subject');
  const spkiT = need(TAG.SEQUENCE, 'subjectPublicKeyInfo');
  const extensions = new Map<string, CertificateExtension>();
  const extensionOrder: string[] = [];
  for (; i < f.length; i++) {
    const t = f[i]!;
    if (t.tag !== 0xa3) continue; // issuerUniqueID / subjectUniqueID are ignored
    const list = readTlv(der, t.contentStart, t.end);
    if (list.tag !== TAG.SEQUENCE) throw new HallmarkError('BAD_DER', 'Certificate: bad extensions');
    for (const ext of children(der, list)) {
      const ef = children(der, ext);
      const oidT = ef[0];
      if (!oidT || oidT.tag !== TAG.OID) throw new HallmarkError('BAD_DER', 'Certificate: bad extension');
      const critical = ef.length === 3 && ef[1]!.tag === TAG.BOOLEAN && der[ef[1]!.contentStart] === 0xff;
      const valueT = ef[ef.length - 1]!;
      if (valueT.tag !== TAG.OCTET_STRING) throw new HallmarkError('BAD_DER', 'Certificate: extension value is not an OCTET STRING');
      const extOid = decodeOid(content(der, oidT));
      extensionOrder.push(extOid);
      extensions.set(extOid, { critical, value: content(der, valueT) });
    }
  }
  const [nbT, naT] = children(der, validityT) as [Tlv, Tlv];
  if (!nbT || !naT) throw new HallmarkError('BAD_DER', 'Certificate: bad validity');
  const serial = content(der, serialT);
  const sigAlgOidT = children(der, sigAlgT)[0];
  if (!sigAlgOidT || sigAlgOidT.tag !== TAG.OID) throw new HallmarkError('BAD_DER', 'Certificate: bad signature algorithm');
  if (der[sigT.contentStart] !== 0) throw new HallmarkError('BAD_DER', 'Certificate: signature has unused bits');
  return {
    der,
    tbs: whole(der, tbsT),
    version,
    serialHex: serial.toString('hex'),
    serialNegativeOrZero: (serial[0]! & 0x80) !== 0 || serial.every((b) => b === 0),
    tbsSignatureAlgorithm: whole(der, tbsSigT),
    issuer: whole(der, issuerT),
    notBefore: decodeTime(der, nbT),
    notAfter: decodeTime(der, naT),
    subject: whole(der, subjectT),
    subjectPublicKeyInfo: whole(der, spkiT),
    extensions,
    extensionOrder,
    signatureAlgorithm: whole(der, sigAlgT),
    signatureAlgorithmOid: decodeOid(content(der, sigAlgOidT)),
    signature: der.subarray(sigT.contentStart + 1, sigT.end),
  };
}

/** Serial as the canonical lowercase hex used in the store and on the CLI: no sign byte, no leading zeros beyond a pair. */
export function serialToHex(magnitude: Buffer): string {
  let i = 0;
  while (i < magnitude.length - 1 && magnitude[i] === 0) i++;
  return magnitude.subarray(i).toString('hex');
}

export function normaliseSerialHex(hex: string): string {
  const clean = hex.toLowerCase().replace(/[:\s]/g, '');
  if (!/^[0-9a-f]+$/.test(clean) || clean.length > 40) throw new HallmarkError('BAD_REQUEST', `not a serial number: ${JSON.stringify(hex)}`);
  const even = clean.length % 2 ? '0' + clean : clean;
  return serialToHex(Buffer.from(even, 'hex'));
}

export function sha256Fingerprint(der: Buffer): string {
  return createHash('sha256').update(der).digest('hex');
}
