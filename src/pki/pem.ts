// PEM (RFC 7468) decoding and encoding with size limits.

import { HallmarkError } from '../errors.js';

/** Limits per kind of object; anything larger is refused before it is decoded. */
export const SIZE_LIMITS = {
  csr: 64 * 1024,
  certificate: 64 * 1024,
  chain: 512 * 1024,
  crl: 64 * 1024 * 1024,
} as const;

export interface PemBlock { readonly label: string; readonly der: Buffer }

const BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----\r?\n([\s\S]*?)-----END ([A-Z0-9 ]+)-----/g;

/** Decodes every PEM block in `text`. Throws BAD_PEM when there is none or one is broken. */
export function decodePemBlocks(text: string, maxBytes: number): PemBlock[] {
  if (text.length > maxBytes * 2) throw new HallmarkError('INPUT_TOO_LARGE', `PEM input is larger than ${maxBytes * 2} characters`);
  const blocks: PemBlock[] = [];
  const begins = (text.match(/-----BEGIN /g) ?? []).length;
  for (const m of text.matchAll(BLOCK)) {
    const [, label, body, endLabel] = m;
    if (label !== endLabel) throw new HallmarkError('BAD_PEM', `PEM block BEGIN ${label} ends with END ${endLabel}`);
    const b64 = body!.replace(/[\r\n\t ]/g, '');
    if (/^[A-Za-z]+-[A-Za-z]+:/m.test(body!)) throw new HallmarkError('BAD_PEM', `PEM block ${label} has headers (legacy encrypted PEM is not accepted)`);
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64) || b64.length % 4 !== 0 || b64.length === 0) {
      throw new HallmarkError('BAD_PEM', `PEM block ${label} is not valid base64 (truncated?)`);
    }
    const der = Buffer.from(b64, 'base64');
    if (der.length > maxBytes) throw new HallmarkError('INPUT_TOO_LARGE', `PEM block ${label} is ${der.length} bytes, over the ${maxBytes}-byte limit`);
    blocks.push({ label: label!, der });
  }
  if (blocks.length !== begins) throw new HallmarkError('BAD_PEM', 'PEM input has an unterminated block (truncated?)');
  if (blocks.length === 0) throw new HallmarkError('BAD_PEM', 'no PEM block found');
  return blocks;
}

/**
 * Accepts PEM with one of `labels`, or raw DER / base64 DER (as EST sends). Returns the DER.
 */
export function decodeOne(input: string | Buffer, labels: readonly string[], maxBytes: number): Buffer {
  if (input.length > maxBytes * 2) throw new HallmarkError('INPUT_TOO_LARGE', `input is larger than ${maxBytes * 2} bytes`);
  const buf = typeof input === 'string' ? Buffer.from(input, 'utf8') : input;
  if (buf.length > 0 && buf[0] === 0x30) {
    if (buf.length > maxBytes) throw new HallmarkError('INPUT_TOO_LARGE', `DER input is over the ${maxBytes}-byte limit`);
    return buf; // raw DER
  }
  const text = buf.toString('utf8');
  if (text.includes('-----BEGIN ')) {
    const blocks = decodePemBlocks(text, maxBytes);
    if (blocks.length !== 1) throw new HallmarkError('BAD_PEM', `expected one PEM block, found ${blocks.length}`);
    const block = blocks[0]!;
    if (!labels.includes(block.label)) throw new HallmarkError('BAD_PEM', `expected PEM ${labels.join(' or ')}, found ${block.label}`);
    return block.der;
  }
  const b64 = text.replace(/[\r\n\t ]/g, '');
  if (b64.length > 0 && /^[A-Za-z0-9+/]*={0,2}$/.test(b64) && b64.length % 4 === 0) {
    const der = Buffer.from(b64, 'base64');
    if (der.length > maxBytes) throw new HallmarkError('INPUT_TOO_LARGE', `input is over the ${maxBytes}-byte limit`);
    return der;
  }
  throw new HallmarkError('BAD_PEM', `input is neither PEM (${labels.join(', ')}) nor DER`);
}

export function encodePem(label: string, der: Uint8Array): string {
  const b64 = Buffer.from(der).toString('base64');
  let out = `-----BEGIN ${label}-----\n`;
  for (let i = 0; i < b64.length; i += 64) out += b64.slice(i, i + 64) + '\n';
  return out + `-----END ${label}-----\n`;
}
