// PKCS#10 certificate signing requests (RFC 2986): a fast parser and verifier for the issuance
// path, and a builder used by the device agent, tests and benchmarks.

import { sign as cryptoSign, verify as cryptoVerify, createPublicKey, KeyObject, webcrypto } from 'node:crypto';
import { HallmarkError } from '../errors.js';
import { SCHEME_BY_OID, isAcceptableSubjectKey, keyAlgorithmOf, publicKeyFromSpki, signingSchemeFor, type SignatureScheme } from './algorithms.js';
import { TAG, bitString, children, content, ctx, decodeOid, readWhole, seq, set, smallInteger, whole, oid, type Tlv } from './der.js';
import { SIZE_LIMITS } from './pem.js';

export const OID_EXTENSION_REQUEST = '1.2.840.113549.1.9.14';
export const OID_CHALLENGE_PASSWORD = '1.2.840.113549.1.9.7';

export interface CsrAttribute { readonly oid: string; readonly values: readonly Buffer[] }

export interface ParsedCsr {
  readonly der: Buffer;
  /** The signed part (CertificationRequestInfo), as it was signed. */
  readonly info: Buffer;
  readonly subject: Buffer;
  readonly subjectPublicKeyInfo: Buffer;
  readonly attributes: readonly CsrAttribute[];
  readonly scheme: SignatureScheme;
  readonly signatureAlgorithmOid: string;
  readonly signature: Buffer;
}

function bad(msg: string): HallmarkError {
  return new HallmarkError('BAD_CSR', `malformed CSR: ${msg}`);
}

/** Parses a DER CSR. Does not verify the signature (see verifyCsr). */
export function parseCsr(der: Buffer): ParsedCsr {
  if (der.length > SIZE_LIMITS.csr) throw new HallmarkError('INPUT_TOO_LARGE', `CSR is over the ${SIZE_LIMITS.csr}-byte limit`);
  try {
    const root = readWhole(der, TAG.SEQUENCE, 'CertificationRequest');
    const parts = children(der, root);
    if (parts.length !== 3) throw bad('expected info, algorithm and signature');
    const [infoT, algT, sigT] = parts as [Tlv, Tlv, Tlv];
    if (infoT.tag !== TAG.SEQUENCE || algT.tag !== TAG.SEQUENCE || sigT.tag !== TAG.BIT_STRING) throw bad('bad structure');
    const f = children(der, infoT);
    if (f.length < 3 || f[0]!.tag !== TAG.INTEGER || f[1]!.tag !== TAG.SEQUENCE || f[2]!.tag !== TAG.SEQUENCE) throw bad('bad CertificationRequestInfo');
    const version = content(der, f[0]!);
    if (version.length !== 1 || version[0] !== 0) throw bad('version must be 0 (v1)');
    const attributes: CsrAttribute[] = [];
    const attrsT = f[3];
    if (attrsT) {
      if (attrsT.tag !== 0xa0) throw bad('bad attributes');
      for (const a of children(der, attrsT)) {
        const [typeT, valuesT] = children(der, a) as [Tlv, Tlv];
        if (!typeT || typeT.tag !== TAG.OID || !valuesT || valuesT.tag !== TAG.SET) throw bad('bad attribute');
        attributes.push({ oid: decodeOid(content(der, typeT)), values: children(der, valuesT).map((v) => whole(der, v)) });
      }
    }
    const algOidT = children(der, algT)[0];
    if (!algOidT || algOidT.tag !== TAG.OID) throw bad('bad signature algorithm');
    const signatureAlgorithmOid = decodeOid(content(der, algOidT));
    const scheme = SCHEME_BY_OID.get(signatureAlgorithmOid);
    if (!scheme) throw new HallmarkError('UNSUPPORTED_ALGORITHM', `CSR signature algorithm ${signatureAlgorithmOid} is not supported`);
    if (der[sigT.contentStart] !== 0) throw bad('signature BIT STRING has unused bits');
    return {
      der,
      info: whole(der, infoT),
      subject: whole(der, f[1]!),
      subjectPublicKeyInfo: whole(der, f[2]!),
      attributes,
      scheme,
      signatureAlgorithmOid,
      signature: der.subarray(sigT.contentStart + 1, sigT.end),
    };
  } catch (err) {
    if (err instanceof HallmarkError && err.code === 'BAD_DER') throw new HallmarkError('BAD_CSR', `malformed CSR: ${err.message.replace(/^malformed DER: /, '')}`);
    throw err;
  }
}

function schemeMatchesKey(scheme: SignatureScheme, key: KeyObject): boolean {
  const type = key.asymmetricKeyType;
  if (scheme.name.startsWith('ecdsa')) return type === 'ec';
  if (scheme.name.startsWith('sha')) return type === 'rsa';
  return type === 'ed25519';
}

// A P-256 SPKI with an uncompressed point: these 26 bytes, then the 65-byte point (04 || X || Y).
const P256_SPKI_PREFIX = Buffer.from('3059301306072a8648ce3d020106082a8648ce3d030107034200', 'hex');
const ECDSA_P256 = { name: 'ECDSA', namedCurve: 'P-256' } as const;

/**
 * The CSR's key. P-256 (the device case) is imported from its raw point through WebCrypto: measured
 * (bench/, docs/benchmarks.md) ~52 µs on the event loop against ~66 µs for the JWK path of
 * publicKeyFromSpki, and the key it yields verifies ~20 µs faster on first use (the JWK path makes a
 * legacy EC_KEY that OpenSSL 3 must export to its provider). Node still validates the point
 * (on-curve and order check, checkEcKeyData), so nothing is accepted that the JWK path refuses.
 */
async function importCsrKey(spki: Buffer): Promise<KeyObject> {
  if (spki.length === 91 && spki.compare(P256_SPKI_PREFIX, 0, 26, 0, 26) === 0 && spki[26] === 0x04) {
    try {
      return KeyObject.from(await webcrypto.subtle.importKey('raw', spki.subarray(26), ECDSA_P256, true, ['verify']));
    } catch (err) {
      throw new HallmarkError('UNSUPPORTED_ALGORITHM', 'public key cannot be imported (unsupported algorithm or invalid point)', { cause: err });
    }
  }
  return publicKeyFromSpki(spki);
}

/**
 * Verifies the CSR's self-signature (proof of possession) and returns its public key.
 * Verification runs on the libuv thread pool (callback form of crypto.verify).
 */
export async function verifyCsr(csr: ParsedCsr): Promise<KeyObject> {
  const key = await importCsrKey(csr.subjectPublicKeyInfo);
  if (!isAcceptableSubjectKey(key)) throw new HallmarkError('UNSUPPORTED_ALGORITHM', `CSR key is not accepted (${key.asymmetricKeyType} ${key.asymmetricKeyDetails?.namedCurve ?? key.asymmetricKeyDetails?.modulusLength ?? ''})`.trim());
  if (!schemeMatchesKey(csr.scheme, key)) throw new HallmarkError('CSR_SIGNATURE_INVALID', `CSR signature algorithm ${csr.scheme.name} does not match its ${key.asymmetricKeyType} key`);
  const ok = await new Promise<boolean>((resolve) => {
    cryptoVerify(csr.scheme.hash, csr.info, key, csr.signature, (err, result) => resolve(!err && result));
  });
  if (!ok) throw new HallmarkError('CSR_SIGNATURE_INVALID', 'CSR signature does not verify with the public key it carries');
  return key;
}

/**
 * The CSR key's SubjectPublicKeyInfo as Node would export it (canonical DER), given the key verifyCsr
 * returned. A P-256 key with an uncompressed point is already in that form (and verifyCsr imported,
 * hence validated, exactly these bytes), so it is not exported again: an export costs ~15-20 µs of
 * event-loop time, and the enrolment path needs the SPKI twice.
 */
export function csrSpkiOf(csr: ParsedCsr, key: KeyObject): Buffer {
  const spki = csr.subjectPublicKeyInfo;
  if (spki.length === 91 && spki.compare(P256_SPKI_PREFIX, 0, 26, 0, 26) === 0 && spki[26] === 0x04) return spki;
  return key.export({ type: 'spki', format: 'der' });
}

/** Extensions the CSR requests (OID -> DER value); informational only, never copied blindly. */
export function requestedExtensions(csr: ParsedCsr): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  const attr = csr.attributes.find((a) => a.oid === OID_EXTENSION_REQUEST);
  const v = attr?.values[0];
  if (!v) return out;
  const list = readWhole(v, TAG.SEQUENCE, 'extensionRequest');
  for (const ext of children(v, list)) {
    const ef = children(v, ext);
    const valueT = ef[ef.length - 1]!;
    out.set(decodeOid(content(v, ef[0]!)), content(v, valueT));
  }
  return out;
}

/** Builds and signs a CSR. `subject` is a DER Name; attributes are pre-encoded Attribute SEQUENCEs. */
export function createCsr(options: { subject: Buffer; privateKey: KeyObject; publicKey?: KeyObject; attributes?: readonly Buffer[] }): Buffer {
  const publicKey = options.publicKey ?? createPublicKey(options.privateKey);
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  const scheme = signingSchemeFor(keyAlgorithmOf(publicKey));
  const info = seq(smallInteger(0), options.subject, spki, ctx(0, Buffer.concat(options.attributes ?? [])));
  const signature = cryptoSign(scheme.hash, info, options.privateKey);
  return seq(info, scheme.algorithmIdentifier, bitString(signature));
}

/** Builds a CSR whose signature is made elsewhere (a key backend, a token). */
export async function createCsrWith(subject: Buffer, spki: Buffer, scheme: SignatureScheme, sign: (data: Buffer) => Promise<Buffer>, attributes: readonly Buffer[] = []): Promise<Buffer> {
  const info = seq(smallInteger(0), subject, spki, ctx(0, Buffer.concat(attributes)));
  return seq(info, scheme.algorithmIdentifier, bitString(await sign(info)));
}

/** An extensionRequest attribute carrying the given DER Extensions. */
export const extensionRequestAttribute = (extensions: readonly Buffer[]): Buffer => seq(oid(OID_EXTENSION_REQUEST), set(seq(...extensions)));
