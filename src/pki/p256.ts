// P-256 public key validation without OpenSSL, for bulk imports.
//
// Importing a key through node:crypto (createPublicKey, JWK or DER) costs ~70 µs in OpenSSL 3, more
// than the rest of a manifest entry's checks together; this check costs ~2 µs. For a curve of prime
// order (cofactor 1) such as P-256, a point (x, y) with 0 <= x, y < p that satisfies the curve equation
// is a valid public key (NIST SP 800-56A rev. 3, 5.6.2.3.3: the order check is implied), and the
// point at infinity has no uncompressed encoding. The registry imports every key with OpenSSL again
// when it stores it; test/registry/manifests/p256.test.ts checks this against OpenSSL.

const P = 0xffffffff00000001000000000000000000000000ffffffffffffffffffffffffn;
const B = 0x5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604bn;

/** A P-256 SubjectPublicKeyInfo with an uncompressed point is these 27 bytes, then X and Y (32 bytes each). */
export const P256_SPKI_PREFIX = Buffer.from('3059301306072a8648ce3d020106082a8648ce3d03010703420004', 'hex');

/** True when the 32-byte big-endian coordinates are a point on P-256 (y² = x³ − 3x + b mod p). */
export function isP256Point(x: Buffer, y: Buffer): boolean {
  if (x.length !== 32 || y.length !== 32) return false;
  const X = BigInt(`0x${x.toString('hex')}`);
  const Y = BigInt(`0x${y.toString('hex')}`);
  if (X >= P || Y >= P) return false;
  return (Y * Y - (X * X % P * X - 3n * X + B)) % P === 0n;
}

/** True when `spki` is the canonical encoding of a P-256 key (named curve, uncompressed point). */
export function isP256Spki(spki: Buffer): boolean {
  return spki.length === 91 && spki.compare(P256_SPKI_PREFIX, 0, 27, 0, 27) === 0;
}
