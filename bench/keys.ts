// Signing keys and CSRs for benchmarks, made in bulk before any timing.
//
// Keys from createECDH, not generateKeyPairSync: Node 20 can deadlock when a key's details are read
// while a GC finalises the KeyGenJob that made it (bench/issuance.bench.ts); ECDH keys involve no such
// job. The private key object is imported from the raw scalar and point as a JWK.

import { createECDH, createPrivateKey, type ECDH, type KeyObject } from 'node:crypto';
import { createCsr } from '../src/pki/csr.js';
import { encodeNameString } from '../src/pki/names.js';

let ecdh: ECDH | undefined;

/** A fresh P-256 private key. */
export function benchP256Key(): KeyObject {
  ecdh ??= createECDH('prime256v1');
  ecdh.generateKeys();
  const point = ecdh.getPublicKey();
  return createPrivateKey({
    key: { kty: 'EC', crv: 'P-256', x: point.subarray(1, 33).toString('base64url'), y: point.subarray(33, 65).toString('base64url'), d: Buffer.from(ecdh.getPrivateKey().toString('hex').padStart(64, '0'), 'hex').toString('base64url') },
    format: 'jwk',
  });
}

/** A DER PKCS#10 CSR with a fresh P-256 key. */
export function benchCsr(subject = 'CN=bench'): Buffer {
  return createCsr({ subject: encodeNameString(subject), privateKey: benchP256Key() });
}
