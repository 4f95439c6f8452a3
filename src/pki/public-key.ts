// Reading a public key handed in by a person or a program.

import { createPublicKey } from 'node:crypto';
import { HallmarkError } from '../errors.js';
import { parseCertificate } from './certificate.js';
import { SIZE_LIMITS, decodeOne } from './pem.js';

/** A public key file: PEM/DER SPKI, or a certificate whose key is taken. */
export function publicKeyFromFile(content: Buffer): Buffer {
  const text = content.toString('utf8');
  if (text.includes('BEGIN CERTIFICATE')) return parseCertificate(decodeOne(content, ['CERTIFICATE'], SIZE_LIMITS.certificate)).subjectPublicKeyInfo;
  const der = decodeOne(content, ['PUBLIC KEY'], SIZE_LIMITS.certificate);
  try {
    return createPublicKey({ key: der, format: 'der', type: 'spki' }).export({ type: 'spki', format: 'der' });
  } catch {
    throw new HallmarkError('BAD_DER', 'the public key file holds no SubjectPublicKeyInfo');
  }
}

