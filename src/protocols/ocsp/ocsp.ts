// OCSP (RFC 6960) wire formats: parse a request, build and sign a response, and (for tests and tools)
// build a request and parse and verify a response.
//
// Parsing uses the PeculiarVentures ASN.1 schemas (@peculiar/asn1-ocsp): requests come from anyone, and
// a complete, maintained schema is the safer reader for hostile input. The outer TLV is first checked
// with the strict DER reader (definite lengths, no trailing bytes) so garbage is refused before the
// general parser sees it.
//
// Responses are written with the small DER writer (src/pki/der.ts), not an ASN.1 object model: a
// response is a handful of pre-encoded pieces (responder id, certificates, CertID) joined around one
// signature, and building it through asn1-schema would cost more event-loop time than the rest of a
// cache miss. The responder pre-signs and caches responses, so this is the path a cache miss and every
// nonce request take.

import { createHash, verify as cryptoVerify } from 'node:crypto';
import { AsnConvert } from '@peculiar/asn1-schema';
import type { Extension } from '@peculiar/asn1-x509';
import { BasicOCSPResponse, OCSPRequest, OCSPResponse, id_pkix_ocsp_basic, id_pkix_ocsp_nonce } from '@peculiar/asn1-ocsp';
import { HallmarkError } from '../../errors.js';
import type { Signer } from '../../keys/key-backend.js';
import { SCHEME_BY_OID, publicKeyFromSpki, signingSchemeFor } from '../../pki/algorithms.js';
import { parseCertificate, serialToHex } from '../../pki/certificate.js';
import { NULL, TAG, bitString, children, content, ctx, expectTlv, octetString, oid, readWhole, seq, tlv, whole } from '../../pki/der.js';
import { verifyIssuedBy } from '../../pki/verify.js';

// ---------------------------------------------------------------- constants

export const OCSP_OIDS = {
  basic: id_pkix_ocsp_basic,
  nonce: id_pkix_ocsp_nonce,
  sha1: '1.3.14.3.2.26',
  sha256: '2.16.840.1.101.3.4.2.1',
  sha384: '2.16.840.1.101.3.4.2.2',
  sha512: '2.16.840.1.101.3.4.2.3',
} as const;

/** CertID hash algorithms the responder matches issuers with (RFC 6960 names SHA-1; SHA-256 is common too). */
export const CERT_ID_HASHES: ReadonlyMap<string, 'sha1' | 'sha256' | 'sha384' | 'sha512'> = new Map([
  [OCSP_OIDS.sha1, 'sha1'],
  [OCSP_OIDS.sha256, 'sha256'],
  [OCSP_OIDS.sha384, 'sha384'],
  [OCSP_OIDS.sha512, 'sha512'],
]);

/** OCSPResponseStatus (RFC 6960 §4.2.1); 4 is not used. */
export const OCSP_STATUS = { successful: 0, malformedRequest: 1, internalError: 2, tryLater: 3, sigRequired: 5, unauthorized: 6 } as const;
export type OcspResponseStatusName = keyof typeof OCSP_STATUS;

/** Limits on what a request may hold. */
export const OCSP_LIMITS = {
  /** A request's DER size (RFC 5019 requests are under 100 bytes; signed requests carry certificates). */
  requestBytes: 10 * 1024,
  /** CertIDs per request (RFC 5019 clients send one). */
  certIds: 8,
  /** RFC 8954 §2.1: a nonce is 1..32 octets. */
  nonceBytes: 32,
  /** Request extensions. */
  extensions: 8,
} as const;

/** An OCSPResponse that is only a status: SEQUENCE { ENUMERATED status }. */
export function encodeOcspStatusResponse(status: Exclude<OcspResponseStatusName, 'successful'>): Buffer {
  return Buffer.from([0x30, 0x03, 0x0a, 0x01, OCSP_STATUS[status]]);
}

// ---------------------------------------------------------------- requests

export interface OcspCertId {
  /** OID of the hash over the issuer name and key. */
  readonly hashAlgorithm: string;
  /** The AlgorithmIdentifier exactly as the client sent it (echoed in the response: some clients compare it whole). */
  readonly hashAlgorithmDer: Buffer;
  readonly issuerNameHash: Buffer;
  readonly issuerKeyHash: Buffer;
  /** The serial's unsigned magnitude, as the store writes it (lower-case hex, no leading zero byte), or null when the INTEGER is zero or negative (never issued). */
  readonly serialHex: string | null;
  /** The CertID re-encoded for the response (hash algorithm as sent, serial in canonical DER). */
  readonly der: Buffer;
}

export interface ParsedOcspRequest {
  readonly certIds: readonly OcspCertId[];
  /** The nonce extension's extnValue exactly as sent (echoed verbatim), when there is one. */
  readonly nonce?: Buffer;
  /** The request carried an optionalSignature (accepted, not checked: this responder answers anyone). */
  readonly signed: boolean;
}

const malformed = (message: string, cause?: unknown): HallmarkError => new HallmarkError('BAD_REQUEST', `malformed OCSP request: ${message}`, { cause });

/**
 * Parses an OCSPRequest (DER). Throws HallmarkError BAD_REQUEST (the responder answers malformedRequest)
 * or INPUT_TOO_LARGE.
 */
export function parseOcspRequest(der: Buffer): ParsedOcspRequest {
  if (der.length > OCSP_LIMITS.requestBytes) throw new HallmarkError('INPUT_TOO_LARGE', `OCSP request of ${der.length} bytes is over the ${OCSP_LIMITS.requestBytes}-byte limit`);
  if (der.length === 0) throw malformed('empty request');
  try {
    readWhole(der, TAG.SEQUENCE, 'OCSPRequest');
  } catch (err) {
    throw malformed((err as Error).message, err);
  }
  let request: OCSPRequest;
  try {
    request = AsnConvert.parse(der, OCSPRequest);
  } catch (err) {
    throw malformed(`not an OCSPRequest (${(err as Error).message})`, err);
  }
  const tbs = request.tbsRequest;
  if (!tbs || !Array.isArray(tbs.requestList)) throw malformed('no requestList');
  if (tbs.version !== undefined && Number(tbs.version) !== 0) throw malformed(`unsupported version ${String(tbs.version)}`);
  if (tbs.requestList.length === 0) throw malformed('the requestList is empty');
  if (tbs.requestList.length > OCSP_LIMITS.certIds) throw malformed(`${tbs.requestList.length} CertIDs in one request (at most ${OCSP_LIMITS.certIds})`);

  const certIds = tbs.requestList.map((r, i) => {
    const id = r.reqCert;
    if (!id || !id.hashAlgorithm) throw malformed(`request ${i + 1} has no CertID`);
    const hashAlgorithmDer = Buffer.from(AsnConvert.serialize(id.hashAlgorithm));
    const issuerNameHash = Buffer.from(id.issuerNameHash.buffer);
    const issuerKeyHash = Buffer.from(id.issuerKeyHash.buffer);
    const serial = Buffer.from(id.serialNumber);
    if (issuerNameHash.length === 0 || issuerNameHash.length > 64 || issuerKeyHash.length === 0 || issuerKeyHash.length > 64) throw malformed(`request ${i + 1}: issuer hashes of ${issuerNameHash.length} and ${issuerKeyHash.length} bytes`);
    if (serial.length === 0 || serial.length > 64) throw malformed(`request ${i + 1}: a serial number of ${serial.length} bytes`);
    const negative = (serial[0]! & 0x80) !== 0;
    const magnitude = negative ? undefined : serialToHex(serial);
    const serialHex = magnitude === undefined || /^0+$/.test(magnitude) ? null : magnitude;
    const certId: OcspCertId = {
      hashAlgorithm: id.hashAlgorithm.algorithm,
      hashAlgorithmDer,
      issuerNameHash,
      issuerKeyHash,
      serialHex,
      der: seq(hashAlgorithmDer, octetString(issuerNameHash), octetString(issuerKeyHash), serialHex === null ? tlv(TAG.INTEGER, serial) : integerFromHex(serialHex)),
    };
    return certId;
  });

  let nonce: Buffer | undefined;
  const extensions = tbs.requestExtensions ?? [];
  if (extensions.length > OCSP_LIMITS.extensions) throw malformed(`${extensions.length} request extensions (at most ${OCSP_LIMITS.extensions})`);
  for (const ext of extensions) {
    if (ext.extnID === OCSP_OIDS.nonce) {
      if (nonce) throw malformed('two nonce extensions');
      nonce = Buffer.from(ext.extnValue.buffer);
      const length = nonceLength(nonce);
      if (length < 1 || length > OCSP_LIMITS.nonceBytes) throw malformed(`a nonce of ${length} bytes (RFC 8954: 1 to ${OCSP_LIMITS.nonceBytes})`);
    } else if (ext.critical) {
      throw malformed(`unsupported critical request extension ${ext.extnID}`);
    }
  }
  return { certIds, nonce, signed: !!request.optionalSignature };
}

/**
 * The length of the nonce an extnValue carries. RFC 8954 (and OpenSSL since 1.1) put an OCTET STRING
 * inside extnValue; some old clients put the raw bytes there. Either way the extnValue is echoed as sent.
 */
export function nonceLength(extnValue: Buffer): number {
  try {
    const t = readWhole(extnValue, TAG.OCTET_STRING, 'nonce');
    return t.end - t.contentStart;
  } catch {
    return extnValue.length;
  }
}

function integerFromHex(hex: string): Buffer {
  const magnitude = Buffer.from(hex.length % 2 ? '0' + hex : hex, 'hex');
  return (magnitude[0]! & 0x80) ? tlv(TAG.INTEGER, Buffer.from([0]), magnitude) : tlv(TAG.INTEGER, magnitude);
}

// ---------------------------------------------------------------- issuer hashes

/** The BIT STRING value of an SPKI (the key bytes the issuerKeyHash and ResponderID byKey hash). */
export function subjectPublicKeyBits(spki: Buffer): Buffer {
  const outer = readWhole(spki, TAG.SEQUENCE, 'SubjectPublicKeyInfo');
  const [, bits] = children(spki, outer);
  if (!bits || bits.tag !== TAG.BIT_STRING || bits.end - bits.contentStart < 1) throw new HallmarkError('BAD_DER', 'malformed DER: SubjectPublicKeyInfo has no key bits');
  return spki.subarray(bits.contentStart + 1, bits.end);
}

export interface IssuerHashes {
  readonly hash: 'sha1' | 'sha256' | 'sha384' | 'sha512';
  readonly nameHash: Buffer;
  readonly keyHash: Buffer;
}

/** issuerNameHash and issuerKeyHash of a CA certificate under one hash. */
export function issuerHashes(caCertificateDer: Buffer, hash: IssuerHashes['hash'] = 'sha1'): IssuerHashes {
  const cert = parseCertificate(caCertificateDer);
  return {
    hash,
    nameHash: createHash(hash).update(cert.subject).digest(),
    keyHash: createHash(hash).update(subjectPublicKeyBits(cert.subjectPublicKeyInfo)).digest(),
  };
}

/** SHA-1 of the key bits: the ResponderID byKey (RFC 6960 §4.2.1). */
export const responderKeyHash = (spki: Buffer): Buffer => createHash('sha1').update(subjectPublicKeyBits(spki)).digest();

// ---------------------------------------------------------------- responses

export type CertStatusValue =
  | { readonly kind: 'good' }
  | { readonly kind: 'revoked'; readonly at: Date; /** RFC 5280 CRLReason code; absent for unspecified. */ readonly reason?: number }
  | { readonly kind: 'unknown' };

export interface SingleResponseSpec {
  /** The CertID to answer for (OcspCertId.der). */
  readonly certIdDer: Buffer;
  readonly status: CertStatusValue;
  readonly thisUpdate: Date;
  readonly nextUpdate?: Date;
}

/** OCSP times are GeneralizedTime, seconds precision, Z (RFC 6960 §4.2.2.1). */
export function generalizedTime(date: Date): Buffer {
  const p = (n: number, w = 2): string => String(n).padStart(w, '0');
  const s = p(date.getUTCFullYear(), 4) + p(date.getUTCMonth() + 1) + p(date.getUTCDate()) + p(date.getUTCHours()) + p(date.getUTCMinutes()) + p(date.getUTCSeconds()) + 'Z';
  return tlv(TAG.GENERALIZED_TIME, Buffer.from(s, 'ascii'));
}

const GOOD = Buffer.from([0x80, 0x00]);
const UNKNOWN = Buffer.from([0x82, 0x00]);

/** One SingleResponse (DER). */
export function encodeSingleResponse(spec: SingleResponseSpec): Buffer {
  const s = spec.status;
  let status: Buffer;
  if (s.kind === 'good') status = GOOD;
  else if (s.kind === 'unknown') status = UNKNOWN;
  else status = tlv(0xa1, generalizedTime(s.at), ...(s.reason === undefined ? [] : [ctx(0, tlv(TAG.ENUMERATED, Buffer.from([s.reason])))]));
  return seq(spec.certIdDer, status, generalizedTime(spec.thisUpdate), ...(spec.nextUpdate ? [ctx(0, generalizedTime(spec.nextUpdate))] : []));
}

export interface OcspSigningIdentity {
  readonly signer: Signer;
  /** The delegated signer's certificate, then (optionally) the CA certificate: sent in the response's certs. */
  readonly certificates: readonly Buffer[];
  /** ResponderID byKey: responderKeyHash(signer.publicKeySpki), computed once. */
  readonly keyHash: Buffer;
}

export interface ResponseSpec {
  readonly responses: readonly SingleResponseSpec[];
  readonly producedAt: Date;
  /** The request's nonce extnValue, echoed (RFC 8954). */
  readonly nonce?: Buffer;
}

/** Builds and signs a successful OCSPResponse (DER): one signature. */
export async function signOcspResponse(responder: OcspSigningIdentity, spec: ResponseSpec): Promise<Buffer> {
  const extensions = spec.nonce ? [ctx(1, seq(seq(oid(OCSP_OIDS.nonce), octetString(spec.nonce))))] : [];
  const tbs = seq(
    // version v1 is the DEFAULT: omitted (DER)
    ctx(2, octetString(responder.keyHash)),
    generalizedTime(spec.producedAt),
    seq(...spec.responses.map(encodeSingleResponse)),
    ...extensions,
  );
  const scheme = signingSchemeFor(responder.signer.ref.algorithm);
  const signature = await responder.signer.sign(tbs);
  const basic = seq(tbs, scheme.algorithmIdentifier, bitString(signature), ctx(0, seq(...responder.certificates)));
  return seq(tlv(TAG.ENUMERATED, Buffer.from([0])), ctx(0, seq(oid(OCSP_OIDS.basic), octetString(basic))));
}

// ---------------------------------------------------------------- requests (client side, for tests and tools)

/** A CertID for `serialHex` issued by the CA whose certificate is `issuerDer`. */
export function certIdFor(issuerDer: Buffer, serialHex: string, hash: IssuerHashes['hash'] = 'sha1', withNullParameters = true): Buffer {
  const h = issuerHashes(issuerDer, hash);
  const oidText = [...CERT_ID_HASHES].find(([, name]) => name === hash)![0];
  return seq(withNullParameters ? seq(oid(oidText), NULL) : seq(oid(oidText)), octetString(h.nameHash), octetString(h.keyHash), integerFromHex(serialHex.toLowerCase()));
}

/** An unsigned OCSPRequest for CertIDs (DER), with a nonce extension when `nonce` is given (the raw nonce bytes; wrapped in an OCTET STRING as RFC 8954 says). */
export function encodeOcspRequest(certIds: readonly Buffer[], nonce?: Buffer): Buffer {
  const requests = seq(...certIds.map((c) => seq(c)));
  const extensions = nonce ? [ctx(2, seq(seq(oid(OCSP_OIDS.nonce), octetString(octetString(nonce)))))] : [];
  return seq(seq(requests, ...extensions));
}

// ---------------------------------------------------------------- responses (client side, for tests and tools)

export interface ParsedSingleResponse {
  readonly hashAlgorithm: string;
  readonly issuerNameHash: Buffer;
  readonly issuerKeyHash: Buffer;
  readonly serialHex: string;
  readonly status: 'good' | 'revoked' | 'unknown';
  readonly revocationTime?: Date;
  readonly revocationReason?: number;
  readonly thisUpdate: Date;
  readonly nextUpdate?: Date;
}

export interface ParsedOcspResponse {
  readonly status: OcspResponseStatusName;
  readonly basic?: {
    readonly responderKeyHash?: Buffer;
    readonly responderName?: Buffer;
    readonly producedAt: Date;
    readonly responses: readonly ParsedSingleResponse[];
    /** The nonce extension's extnValue, when present. */
    readonly nonce?: Buffer;
    readonly certificates: readonly Buffer[];
    readonly tbsResponseData: Buffer;
    readonly signatureAlgorithm: string;
    readonly signature: Buffer;
  };
}

/** Parses an OCSPResponse (DER) with the PeculiarVentures schemas: an independent reader of what signOcspResponse writes. */
export function parseOcspResponse(der: Buffer): ParsedOcspResponse {
  const response = AsnConvert.parse(der, OCSPResponse);
  const statusName = (Object.keys(OCSP_STATUS) as OcspResponseStatusName[]).find((k) => OCSP_STATUS[k] === Number(response.responseStatus));
  if (!statusName) throw new HallmarkError('BAD_DER', `unknown OCSP response status ${String(response.responseStatus)}`);
  if (statusName !== 'successful') return { status: statusName };
  if (!response.responseBytes || response.responseBytes.responseType !== OCSP_OIDS.basic) throw new HallmarkError('BAD_DER', 'a successful OCSP response without a basic response');
  const basicDer = Buffer.from(response.responseBytes.response.buffer);
  const basic = AsnConvert.parse(basicDer, BasicOCSPResponse);
  // The signed bytes, exactly as received.
  const outer = readWhole(basicDer, TAG.SEQUENCE, 'BasicOCSPResponse');
  const tbsT = expectTlv(basicDer, outer.contentStart, TAG.SEQUENCE, outer.end, 'tbsResponseData');
  const data = basic.tbsResponseData;
  const nonceExt = (data.responseExtensions ?? []).find((e: Extension) => e.extnID === OCSP_OIDS.nonce);
  return {
    status: statusName,
    basic: {
      responderKeyHash: data.responderID.byKey ? Buffer.from(data.responderID.byKey.buffer) : undefined,
      responderName: data.responderID.byName ? Buffer.from(AsnConvert.serialize(data.responderID.byName)) : undefined,
      producedAt: data.producedAt,
      responses: data.responses.map((r) => ({
        hashAlgorithm: r.certID.hashAlgorithm.algorithm,
        issuerNameHash: Buffer.from(r.certID.issuerNameHash.buffer),
        issuerKeyHash: Buffer.from(r.certID.issuerKeyHash.buffer),
        serialHex: serialToHex(Buffer.from(r.certID.serialNumber)),
        status: r.certStatus.revoked ? 'revoked' : r.certStatus.unknown !== undefined ? 'unknown' : 'good',
        revocationTime: r.certStatus.revoked?.revocationTime,
        revocationReason: r.certStatus.revoked?.revocationReason?.reason,
        thisUpdate: r.thisUpdate,
        nextUpdate: r.nextUpdate,
      })),
      nonce: nonceExt ? Buffer.from(nonceExt.extnValue.buffer) : undefined,
      certificates: (basic.certs ?? []).map((c) => Buffer.from(AsnConvert.serialize(c))),
      tbsResponseData: whole(basicDer, tbsT),
      signatureAlgorithm: basic.signatureAlgorithm.algorithm,
      signature: Buffer.from(basic.signature),
    },
  };
}

/**
 * Checks a parsed response's signature and signer: signed by the first certificate in certs, which the
 * CA `issuerDer` issued for OCSP signing — or by the CA itself. Throws on failure.
 */
export function verifyOcspResponse(parsed: ParsedOcspResponse, issuerDer: Buffer): { signer: Buffer } {
  const b = parsed.basic;
  if (!b) throw new HallmarkError('BAD_REQUEST', `response status is ${parsed.status}`);
  const issuer = parseCertificate(issuerDer);
  const signerDer = b.certificates[0] ?? issuerDer;
  const signer = parseCertificate(signerDer);
  if (!signerDer.equals(issuerDer)) {
    verifyIssuedBy(signer, issuer);
    const eku = signer.extensions.get('2.5.29.37');
    if (!eku || !eku.value.includes(oid('1.3.6.1.5.5.7.3.9'))) throw new HallmarkError('BAD_REQUEST', 'the responder certificate lacks id-kp-OCSPSigning');
  }
  if (b.responderKeyHash && !b.responderKeyHash.equals(responderKeyHash(signer.subjectPublicKeyInfo))) throw new HallmarkError('BAD_REQUEST', 'the responder id does not name the signer');
  const scheme = SCHEME_BY_OID.get(b.signatureAlgorithm);
  if (!scheme) throw new HallmarkError('UNSUPPORTED_ALGORITHM', `signature algorithm ${b.signatureAlgorithm}`);
  if (!cryptoVerify(scheme.hash, b.tbsResponseData, publicKeyFromSpki(signer.subjectPublicKeyInfo), b.signature)) throw new HallmarkError('BAD_REQUEST', 'the OCSP response signature does not verify');
  return { signer: signerDer };
}

/** The nonce bytes inside an extnValue (the OCTET STRING's content, or the raw value from old clients). */
export function nonceBytes(extnValue: Buffer): Buffer {
  try {
    const t = readWhole(extnValue, TAG.OCTET_STRING, 'nonce');
    return content(extnValue, t);
  } catch {
    return extnValue;
  }
}
