// Key pairs for bulk generation (factory stamps), encoded from fixed DER templates.
//
// Why not generateKeyPair with DER encodings: OpenSSL 3's encoders cost ~200 µs per PKCS#8 + SPKI
// export (measured: P-256 keygen 46 µs, keygen + DER export 254 µs; X25519 keygen + DER 173 µs),
// several times the key generation itself, and they would dominate a 100,000-device run. A P-256
// key from ECDH.generateKeys (OpenSSL's EC key generation over its CSPRNG, ~13 µs) and an X25519
// key exported as JWK give the raw scalars and points; the SPKI and PKCS#8 wrappers around them are
// constant bytes. The result is exactly what OpenSSL itself writes (tests parse it back with node:crypto
// and openssl, and check the public key against the private one).

import { createECDH, generateKeyPair, type ECDH } from 'node:crypto';

// SubjectPublicKeyInfo { AlgorithmIdentifier { id-ecPublicKey, prime256v1 }, BIT STRING (0x00 ‖ 65-byte point) }
const P256_SPKI_PREFIX = Buffer.from('3059301306072a8648ce3d020106082a8648ce3d030107034200', 'hex');
// PrivateKeyInfo { 0, AlgorithmIdentifier, OCTET STRING { ECPrivateKey { 1, OCTET STRING d(32), [1] BIT STRING point } } }
const P256_PKCS8_PREFIX = Buffer.from('308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420', 'hex');
const P256_PKCS8_POINT = Buffer.from('a144034200', 'hex');
// X25519 (RFC 8410): SPKI { { id-X25519 }, BIT STRING (0x00 ‖ 32 bytes) }, PKCS#8 { 0, { id-X25519 }, OCTET STRING { OCTET STRING (32) } }
const X25519_SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');
const X25519_PKCS8_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');

export interface RawKeyPair {
  /** SubjectPublicKeyInfo DER. */
  readonly spki: Buffer;
  /** PKCS#8 PrivateKeyInfo DER (unencrypted: callers keep it in memory or encrypt it). */
  readonly pkcs8: Buffer;
}

let ecdh: ECDH | undefined;

/** A fresh P-256 key pair (synchronous, ~13 µs). */
export function p256KeyPair(): RawKeyPair {
  ecdh ??= createECDH('prime256v1');
  ecdh.generateKeys();
  const point = ecdh.getPublicKey(); // uncompressed, 65 bytes
  const d = ecdh.getPrivateKey(); // big-endian, leading zero bytes dropped
  const scalar = d.length === 32 ? d : Buffer.concat([Buffer.alloc(32 - d.length), d]);
  return { spki: Buffer.concat([P256_SPKI_PREFIX, point]), pkcs8: Buffer.concat([P256_PKCS8_PREFIX, scalar, P256_PKCS8_POINT, point]) };
}

/** A fresh X25519 key pair, generated on the libuv thread pool. */
export function x25519KeyPair(): Promise<RawKeyPair> {
  return new Promise((resolve, reject) => generateKeyPair('x25519', {}, (err, _publicKey, privateKey) => {
    if (err) { reject(err); return; }
    const jwk = privateKey.export({ format: 'jwk' });
    const d = Buffer.from(jwk.d!, 'base64url');
    const x = Buffer.from(jwk.x!, 'base64url');
    if (d.length !== 32 || x.length !== 32) { reject(new Error('unexpected X25519 key length')); return; }
    resolve({ spki: Buffer.concat([X25519_SPKI_PREFIX, x]), pkcs8: Buffer.concat([X25519_PKCS8_PREFIX, d]) });
  }));
}
