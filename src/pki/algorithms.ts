// Key and signature algorithms: names, pre-encoded AlgorithmIdentifiers, and SPKI helpers.

import { createPublicKey, type KeyObject } from 'node:crypto';
import { HallmarkError } from '../errors.js';
import { NULL, oid, seq } from './der.js';

export const KEY_ALGORITHMS = ['ecdsa-p256', 'ecdsa-p384', 'ed25519', 'rsa-2048', 'rsa-3072'] as const;
export type KeyAlgorithm = (typeof KEY_ALGORITHMS)[number];

export function parseKeyAlgorithm(s: string): KeyAlgorithm {
  const aliases: Record<string, KeyAlgorithm> = { p256: 'ecdsa-p256', 'p-256': 'ecdsa-p256', p384: 'ecdsa-p384', 'p-384': 'ecdsa-p384', rsa2048: 'rsa-2048', rsa3072: 'rsa-3072' };
  const a = aliases[s.toLowerCase()] ?? s.toLowerCase();
  if (!(KEY_ALGORITHMS as readonly string[]).includes(a)) {
    throw new HallmarkError('UNSUPPORTED_ALGORITHM', `unknown key algorithm ${JSON.stringify(s)} (one of ${KEY_ALGORITHMS.join(', ')})`);
  }
  return a as KeyAlgorithm;
}

export const OID = {
  ecPublicKey: '1.2.840.10045.2.1',
  prime256v1: '1.2.840.10045.3.1.7',
  secp384r1: '1.3.132.0.34',
  secp521r1: '1.3.132.0.35',
  rsaEncryption: '1.2.840.113549.1.1.1',
  ed25519: '1.3.101.112',
  ecdsaWithSha256: '1.2.840.10045.4.3.2',
  ecdsaWithSha384: '1.2.840.10045.4.3.3',
  ecdsaWithSha512: '1.2.840.10045.4.3.4',
  sha256WithRsa: '1.2.840.113549.1.1.11',
  sha384WithRsa: '1.2.840.113549.1.1.12',
  sha512WithRsa: '1.2.840.113549.1.1.13',
} as const;

/** How a signature is made and which AlgorithmIdentifier names it. */
export interface SignatureScheme {
  readonly name: string;
  /** Digest for crypto.sign / crypto.verify; null for Ed25519. */
  readonly hash: 'sha256' | 'sha384' | 'sha512' | null;
  /** DER AlgorithmIdentifier, ready to splice into a certificate. */
  readonly algorithmIdentifier: Buffer;
}

const scheme = (name: string, hash: SignatureScheme['hash'], algOid: string, withNull: boolean): SignatureScheme =>
  Object.freeze({ name, hash, algorithmIdentifier: withNull ? seq(oid(algOid), NULL) : seq(oid(algOid)) });

export const SCHEMES = {
  ecdsaSha256: scheme('ecdsa-with-SHA256', 'sha256', OID.ecdsaWithSha256, false),
  ecdsaSha384: scheme('ecdsa-with-SHA384', 'sha384', OID.ecdsaWithSha384, false),
  ecdsaSha512: scheme('ecdsa-with-SHA512', 'sha512', OID.ecdsaWithSha512, false),
  rsaSha256: scheme('sha256WithRSAEncryption', 'sha256', OID.sha256WithRsa, true),
  rsaSha384: scheme('sha384WithRSAEncryption', 'sha384', OID.sha384WithRsa, true),
  rsaSha512: scheme('sha512WithRSAEncryption', 'sha512', OID.sha512WithRsa, true),
  ed25519: scheme('Ed25519', null, OID.ed25519, false),
} as const;

/** The signature scheme a CA key of this algorithm signs with. */
export function signingSchemeFor(alg: KeyAlgorithm): SignatureScheme {
  switch (alg) {
    case 'ecdsa-p256': return SCHEMES.ecdsaSha256;
    case 'ecdsa-p384': return SCHEMES.ecdsaSha384;
    case 'ed25519': return SCHEMES.ed25519;
    case 'rsa-2048': case 'rsa-3072': return SCHEMES.rsaSha256;
  }
}

/** Signature schemes accepted on incoming CSRs, by OID. */
export const SCHEME_BY_OID: ReadonlyMap<string, SignatureScheme> = new Map([
  [OID.ecdsaWithSha256, SCHEMES.ecdsaSha256],
  [OID.ecdsaWithSha384, SCHEMES.ecdsaSha384],
  [OID.ecdsaWithSha512, SCHEMES.ecdsaSha512],
  [OID.sha256WithRsa, SCHEMES.rsaSha256],
  [OID.sha384WithRsa, SCHEMES.rsaSha384],
  [OID.sha512WithRsa, SCHEMES.rsaSha512],
  [OID.ed25519, SCHEMES.ed25519],
]);

// A P-256 SPKI with an uncompressed point is always these 27 bytes followed by X and Y (32 bytes each).
const P256_SPKI_PREFIX = Buffer.from('3059301306072a8648ce3d020106082a8648ce3d03010703420004', 'hex');

/**
 * Imports an SPKI public key. P-256 keys take a fast path through JWK coordinates: OpenSSL 3's
 * generic DER decoder costs more than the signature verification itself (PERFORMANCE-NOTES.md).
 */
export function publicKeyFromSpki(spki: Buffer): KeyObject {
  try {
    if (spki.length === 91 && spki.compare(P256_SPKI_PREFIX, 0, 27, 0, 27) === 0) {
      return createPublicKey({
        key: { kty: 'EC', crv: 'P-256', x: spki.toString('base64url', 27, 59), y: spki.toString('base64url', 59, 91) },
        format: 'jwk',
      });
    }
    return createPublicKey({ key: spki, format: 'der', type: 'spki' });
  } catch (err) {
    throw new HallmarkError('UNSUPPORTED_ALGORITHM', 'public key cannot be imported (unsupported algorithm or invalid point)', { cause: err });
  }
}

/** Names the algorithm of a public key, or throws UNSUPPORTED_ALGORITHM. */
export function keyAlgorithmOf(key: KeyObject): KeyAlgorithm {
  const type = key.asymmetricKeyType;
  const d = key.asymmetricKeyDetails ?? {};
  if (type === 'ec' && d.namedCurve === 'prime256v1') return 'ecdsa-p256';
  if (type === 'ec' && d.namedCurve === 'secp384r1') return 'ecdsa-p384';
  if (type === 'ed25519') return 'ed25519';
  if (type === 'rsa' && d.modulusLength === 2048) return 'rsa-2048';
  if (type === 'rsa' && d.modulusLength === 3072) return 'rsa-3072';
  throw new HallmarkError('UNSUPPORTED_ALGORITHM', `unsupported key: ${type}${d.namedCurve ? ' ' + d.namedCurve : ''}${d.modulusLength ? ' ' + d.modulusLength : ''}`);
}

/** Accepted subject keys for end-entity certificates: the CA algorithms plus RSA-4096 and P-521. */
export function isAcceptableSubjectKey(key: KeyObject): boolean {
  const type = key.asymmetricKeyType;
  const d = key.asymmetricKeyDetails ?? {};
  if (type === 'ec') return ['prime256v1', 'secp384r1', 'secp521r1'].includes(d.namedCurve ?? '');
  if (type === 'ed25519') return true;
  if (type === 'rsa') return (d.modulusLength ?? 0) >= 2048 && (d.modulusLength ?? 0) <= 8192;
  return false;
}
