// Minimal DER writer and reader.
//
// Why hand-written: issuance is the hot path. A general ASN.1 object model (asn1js, @peculiar/asn1-schema)
// allocates a tree per field and costs ~10x the signature itself (see ../shared/PERFORMANCE-NOTES.md).
// Certificates here are assembled from pre-encoded pieces (issuer name, algorithm identifiers,
// extension templates) and Buffer.concat; reading walks TLVs over the original buffer without copying.
// Everything else in the code base uses @peculiar/x509 / asn1-* where speed does not matter.

import { HallmarkError } from '../errors.js';

export const TAG = {
  BOOLEAN: 0x01,
  INTEGER: 0x02,
  BIT_STRING: 0x03,
  OCTET_STRING: 0x04,
  NULL: 0x05,
  OID: 0x06,
  ENUMERATED: 0x0a,
  UTF8_STRING: 0x0c,
  PRINTABLE_STRING: 0x13,
  IA5_STRING: 0x16,
  UTC_TIME: 0x17,
  GENERALIZED_TIME: 0x18,
  SEQUENCE: 0x30,
  SET: 0x31,
} as const;

// ---------------------------------------------------------------- writer

function lengthHeader(tag: number, length: number): Buffer {
  if (length < 0x80) return Buffer.from([tag, length]);
  if (length < 0x100) return Buffer.from([tag, 0x81, length]);
  if (length < 0x10000) return Buffer.from([tag, 0x82, length >> 8, length & 0xff]);
  if (length < 0x1000000) return Buffer.from([tag, 0x83, length >> 16, (length >> 8) & 0xff, length & 0xff]);
  return Buffer.from([tag, 0x84, (length >>> 24) & 0xff, (length >> 16) & 0xff, (length >> 8) & 0xff, length & 0xff]);
}

/** One TLV around already-encoded content. */
export function tlv(tag: number, ...content: Buffer[]): Buffer {
  let length = 0;
  for (const c of content) length += c.length;
  const header = lengthHeader(tag, length);
  return Buffer.concat([header, ...content], header.length + length);
}

export const seq = (...content: Buffer[]): Buffer => tlv(TAG.SEQUENCE, ...content);
export const set = (...content: Buffer[]): Buffer => tlv(TAG.SET, ...content);
/** Context-specific tag [n]; constructed unless said otherwise. */
export const ctx = (n: number, content: Buffer, constructed = true): Buffer => tlv((constructed ? 0xa0 : 0x80) | n, content);
export const octetString = (content: Buffer): Buffer => tlv(TAG.OCTET_STRING, content);
export const bitString = (content: Buffer, unusedBits = 0): Buffer => tlv(TAG.BIT_STRING, Buffer.from([unusedBits]), content);
export const utf8String = (s: string): Buffer => tlv(TAG.UTF8_STRING, Buffer.from(s, 'utf8'));
export const printableString = (s: string): Buffer => tlv(TAG.PRINTABLE_STRING, Buffer.from(s, 'ascii'));
export const ia5String = (s: string): Buffer => tlv(TAG.IA5_STRING, Buffer.from(s, 'ascii'));
export const NULL = Buffer.from([0x05, 0x00]);
export const TRUE = Buffer.from([0x01, 0x01, 0xff]);

/** A non-negative INTEGER from its unsigned big-endian magnitude (leading zeros stripped, 0x00 added when the top bit is set). */
export function unsignedInteger(magnitude: Buffer): Buffer {
  let i = 0;
  while (i < magnitude.length - 1 && magnitude[i] === 0) i++;
  const trimmed = magnitude.subarray(i);
  if (trimmed.length === 0) return Buffer.from([0x02, 0x01, 0x00]);
  return (trimmed[0]! & 0x80) ? tlv(TAG.INTEGER, Buffer.from([0]), trimmed) : tlv(TAG.INTEGER, trimmed);
}

export function smallInteger(n: number): Buffer {
  if (!Number.isInteger(n) || n < 0 || n > 0x7fffffff) throw new RangeError('smallInteger out of range');
  const bytes: number[] = [];
  let v = n;
  do { bytes.unshift(v & 0xff); v = Math.floor(v / 256); } while (v > 0);
  if (bytes[0]! & 0x80) bytes.unshift(0);
  return tlv(TAG.INTEGER, Buffer.from(bytes));
}

export function oid(dotted: string): Buffer {
  const parts = dotted.split('.').map((p) => {
    if (!/^\d+$/.test(p)) throw new RangeError(`bad OID ${dotted}`);
    return BigInt(p);
  });
  if (parts.length < 2) throw new RangeError(`bad OID ${dotted}`);
  const body: number[] = [];
  const arcs = [parts[0]! * 40n + parts[1]!, ...parts.slice(2)];
  for (const arc of arcs) {
    const chunk: number[] = [];
    let v = arc;
    do { chunk.unshift(Number(v & 0x7fn)); v >>= 7n; } while (v > 0n);
    for (let k = 0; k < chunk.length - 1; k++) chunk[k]! |= 0x80;
    body.push(...chunk);
  }
  return tlv(TAG.OID, Buffer.from(body));
}

const pad2 = (n: number): string => (n < 10 ? '0' : '') + n;

/** RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; seconds precision, Z. */
export function time(date: Date): Buffer {
  const y = date.getUTCFullYear();
  const rest = pad2(date.getUTCMonth() + 1) + pad2(date.getUTCDate()) + pad2(date.getUTCHours()) + pad2(date.getUTCMinutes()) + pad2(date.getUTCSeconds()) + 'Z';
  if (y >= 1950 && y < 2050) return tlv(TAG.UTC_TIME, Buffer.from(pad2(y % 100) + rest, 'ascii'));
  return tlv(TAG.GENERALIZED_TIME, Buffer.from(String(y).padStart(4, '0') + rest, 'ascii'));
}

// ---------------------------------------------------------------- reader

export interface Tlv {
  readonly tag: number;
  /** Offset of the tag byte. */
  readonly start: number;
  /** Offset of the first content byte. */
  readonly contentStart: number;
  /** Offset one past the last content byte. */
  readonly end: number;
}

function bad(what: string): HallmarkError {
  return new HallmarkError('BAD_DER', `malformed DER: ${what}`);
}

/** Reads one TLV at `offset`, never past `limit`. DER only: no indefinite lengths, minimal length encoding. */
export function readTlv(buf: Uint8Array, offset: number, limit = buf.length): Tlv {
  if (offset + 2 > limit) throw bad('truncated header');
  const tag = buf[offset]!;
  if ((tag & 0x1f) === 0x1f) throw bad('high tag numbers are not supported');
  let lenByte = buf[offset + 1]!;
  let contentStart = offset + 2;
  let length: number;
  if (lenByte < 0x80) {
    length = lenByte;
  } else {
    const n = lenByte & 0x7f;
    if (n === 0) throw bad('indefinite length');
    if (n > 4) throw bad('length too large');
    if (contentStart + n > limit) throw bad('truncated length');
    length = 0;
    for (let i = 0; i < n; i++) length = length * 256 + buf[contentStart + i]!;
    if (buf[contentStart] === 0 || length < 0x80) throw bad('non-minimal length');
    contentStart += n;
  }
  const end = contentStart + length;
  if (end > limit) throw bad('truncated content');
  return { tag, start: offset, contentStart, end };
}

/** Reads a TLV and checks its tag. */
export function expectTlv(buf: Uint8Array, offset: number, tag: number, limit = buf.length, what = 'element'): Tlv {
  const t = readTlv(buf, offset, limit);
  if (t.tag !== tag) throw bad(`${what}: expected tag 0x${tag.toString(16)}, found 0x${t.tag.toString(16)}`);
  return t;
}

/** The children of a constructed TLV. */
export function children(buf: Uint8Array, parent: Tlv): Tlv[] {
  const out: Tlv[] = [];
  let off = parent.contentStart;
  while (off < parent.end) {
    const t = readTlv(buf, off, parent.end);
    out.push(t);
    off = t.end;
  }
  return out;
}

/** Parses a whole buffer as exactly one TLV (no trailing bytes). */
export function readWhole(buf: Uint8Array, tag: number, what: string): Tlv {
  const t = expectTlv(buf, 0, tag, buf.length, what);
  if (t.end !== buf.length) throw bad(`${what}: trailing bytes`);
  return t;
}

export const content = (buf: Buffer, t: Tlv): Buffer => buf.subarray(t.contentStart, t.end);
export const whole = (buf: Buffer, t: Tlv): Buffer => buf.subarray(t.start, t.end);

export function decodeOid(body: Uint8Array): string {
  if (body.length === 0) throw bad('empty OID');
  const arcs: bigint[] = [];
  let v = 0n;
  for (let i = 0; i < body.length; i++) {
    const b = body[i]!;
    v = (v << 7n) | BigInt(b & 0x7f);
    if (!(b & 0x80)) { arcs.push(v); v = 0n; } else if (i === body.length - 1) throw bad('truncated OID');
  }
  const first = arcs[0]!;
  const head = first < 80n ? [first / 40n, first % 40n] : [2n, first - 80n];
  return [...head, ...arcs.slice(1)].join('.');
}

export function decodeTime(buf: Buffer, t: Tlv): Date {
  const s = buf.toString('ascii', t.contentStart, t.end);
  let m: RegExpExecArray | null;
  if (t.tag === TAG.UTC_TIME && (m = /^(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/.exec(s))) {
    const yy = Number(m[1]);
    return new Date(Date.UTC(yy < 50 ? 2000 + yy : 1900 + yy, Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6])));
  }
  if (t.tag === TAG.GENERALIZED_TIME && (m = /^(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/.exec(s))) {
    return new Date(Date.UTC(Number(m[1]), Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6])));
  }
  throw bad(`bad time ${JSON.stringify(s)}`);
}
