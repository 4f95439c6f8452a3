// ECDSA signature encodings.
//
// PKCS#11 (CKM_ECDSA), WebCrypto and JOSE return the raw form r||s, each integer left-padded to the
// curve's field size. X.509, CSRs and OCSP carry the DER form: SEQUENCE { r INTEGER, s INTEGER }
// (RFC 3279 §2.2.3, ECDSA-Sig-Value) with minimal INTEGER encodings. These two functions convert
// between them and reject anything that is not a well-formed signature rather than guess.

import { HallmarkError } from '../errors.js';
import { TAG, children, readWhole, seq, unsignedInteger } from './der.js';

/** Largest field size we accept (P-521: 66 bytes per integer). */
const MAX_FIELD_SIZE = 66;

function bad(what: string): HallmarkError {
  return new HallmarkError('BAD_DER', `malformed ECDSA signature: ${what}`);
}

const isZero = (b: Buffer): boolean => b.every((x) => x === 0);

/**
 * Converts a raw r||s signature (as CKM_ECDSA returns it) to a DER ECDSA-Sig-Value.
 * `raw` must have an even, non-zero length of at most 2 × 66 bytes; r and s must not be zero.
 */
export function ecdsaRawToDer(raw: Buffer): Buffer {
  if (!Buffer.isBuffer(raw)) throw bad('expected a Buffer');
  if (raw.length === 0 || raw.length % 2 !== 0) throw bad(`raw signature length ${raw.length} is not a positive even number`);
  const size = raw.length / 2;
  if (size > MAX_FIELD_SIZE) throw bad(`raw signature length ${raw.length} exceeds ${2 * MAX_FIELD_SIZE} bytes`);
  const r = raw.subarray(0, size);
  const s = raw.subarray(size);
  // r = 0 or s = 0 is never a valid ECDSA signature (SEC 1 §4.1.4 step 1); refuse to encode one.
  if (isZero(r) || isZero(s)) throw bad('r or s is zero');
  return seq(unsignedInteger(r), unsignedInteger(s));
}

/**
 * Converts a DER ECDSA-Sig-Value to raw r||s.
 * @param size byte length of each of r and s: the curve's field size (32 for P-256, 48 for P-384,
 *   66 for P-521). The result is 2 × size bytes.
 */
export function ecdsaDerToRaw(der: Buffer, size: number): Buffer {
  if (!Buffer.isBuffer(der)) throw bad('expected a Buffer');
  if (!Number.isInteger(size) || size <= 0 || size > MAX_FIELD_SIZE) {
    throw new RangeError(`ECDSA field size must be an integer from 1 to ${MAX_FIELD_SIZE}, got ${size}`);
  }
  const outer = readWhole(der, TAG.SEQUENCE, 'ECDSA-Sig-Value');
  const parts = children(der, outer);
  if (parts.length !== 2) throw bad(`expected 2 INTEGERs, found ${parts.length} elements`);
  const out = Buffer.alloc(2 * size);
  parts.forEach((part, i) => {
    const name = i === 0 ? 'r' : 's';
    if (part.tag !== TAG.INTEGER) throw bad(`${name}: expected INTEGER, found tag 0x${part.tag.toString(16)}`);
    let value = der.subarray(part.contentStart, part.end);
    if (value.length === 0) throw bad(`${name}: empty INTEGER`);
    if (value[0]! & 0x80) throw bad(`${name}: negative INTEGER`);
    if (value.length > 1 && value[0] === 0 && !(value[1]! & 0x80)) throw bad(`${name}: non-minimal INTEGER encoding`);
    if (value[0] === 0 && value.length > 1) value = value.subarray(1); // sign pad, not magnitude
    if (isZero(value)) throw bad(`${name} is zero`);
    if (value.length > size) throw bad(`${name} is longer than the ${size}-byte field`);
    value.copy(out, i * size + (size - value.length));
  });
  return out;
}
