// The generic signed device list: CSV (with a header) or NDJSON (one JSON object per line), and a
// detached signature over the exact bytes of the file (docs/manifests.md).
//
// Fields (CSV columns / NDJSON keys):
//   public_key     required: base64 of the SPKI DER (standard or url alphabet), or a one-line PEM
//                  "-----BEGIN PUBLIC KEY-----<base64>-----END PUBLIC KEY-----"
//   udid           hex SHA-256 of the SPKI DER; checked against the key; empty = computed
//   explicit_udid  instead of udid: a vendor-assigned UDID (hex, 1-32 bytes), taken as given
//   serial         the device serial number (empty = none)
//   birth_cert     base64 DER (or one-line PEM) birth certificate; verified against the vendor trust store
//   birth_chain    intermediates between birth_cert and a vendor CA: base64 DER certificates separated by spaces
//   tenant         owner (default "default")
// A CSV header must name public_key, serial and one of udid / explicit_udid; NDJSON needs public_key.
//
// Signature: ECDSA P-256 with SHA-256 (DER ECDSA-Sig-Value, or raw r||s) or Ed25519 (64 bytes), over
// the file bytes, stored binary (what `openssl dgst -sha256 -sign` writes) or as base64 text.

import { createHash, createSign, createVerify, sign as cryptoSign, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { HallmarkError } from '../../errors.js';
import { EntryError, birthChecked, checkCertificateKey, checkSerial, checkUdid, decodeBase64, entryFailure, importSpki, type BirthCheck, type ManifestDevice, type ParsedEntry } from './entries.js';
import type { ManifestSigner } from './signers.js';

/** Ed25519 is not streamable (the whole message is hashed twice): such lists are read into memory, up to this size. */
export const ED25519_MAX_BYTES = 256 * 1024 * 1024;
export const MAX_LINE_BYTES = 1024 * 1024;
const MAX_SIGNATURE_BYTES = 4096;

export const LIST_FIELDS = ['udid', 'explicit_udid', 'public_key', 'serial', 'birth_cert', 'birth_chain', 'tenant'] as const;
type Field = (typeof LIST_FIELDS)[number];

const invalid = (message: string): HallmarkError => new HallmarkError('MANIFEST_INVALID', message);

/** Reads a file as a stream of chunks. */
export async function* fileChunks(path: string): AsyncGenerator<Buffer> {
  const stream = createReadStream(path, { highWaterMark: 1024 * 1024 });
  try {
    for await (const chunk of stream) yield chunk as Buffer;
  } catch (err) {
    throw new HallmarkError('BAD_REQUEST', `cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

// ------------------------------------------------------------------ detached signature

/** Decodes a .sig file: binary, or base64 text of the same bytes. */
export function decodeSignatureFile(content: Buffer, source: string): Buffer {
  if (content.length === 0) throw invalid(`the signature file ${source} is empty`);
  if (content.length > MAX_SIGNATURE_BYTES) throw invalid(`the signature file ${source} is over ${MAX_SIGNATURE_BYTES} bytes; expected a detached ECDSA or Ed25519 signature`);
  const text = content.toString('latin1').trim();
  if (/^[A-Za-z0-9+/_-]+={0,2}$/.test(text) && text.length % 4 !== 1) {
    const decoded = Buffer.from(text, 'base64');
    if (decoded.length === 64 || decoded[0] === 0x30) return decoded;
  }
  return content;
}

export interface SignatureCheck { readonly signer: ManifestSigner; readonly algorithm: 'ecdsa-p256-sha256' | 'ed25519' }

/**
 * Verifies `signature` over the whole file, streaming (ECDSA) or in memory up to ED25519_MAX_BYTES
 * (Ed25519). Returns the signer that verifies it and the file's SHA-256, or throws MANIFEST_INVALID.
 */
export async function verifyDetachedSignature(path: string, signature: Buffer, signers: readonly ManifestSigner[]): Promise<SignatureCheck & { sha256: string }> {
  const isDer = signature[0] === 0x30 && signature.length >= 8 && signature.length <= 72;
  const isRaw = signature.length === 64;
  if (!isDer && !isRaw) throw invalid(`the signature is ${signature.length} bytes: neither a DER ECDSA signature nor a 64-byte Ed25519 / raw ECDSA one`);
  const size = (await stat(path)).size;
  const ec = signers.filter((s) => s.keyType === 'ec-p256');
  const ed = isRaw ? signers.filter((s) => s.keyType === 'ed25519') : [];
  const edFits = size <= ED25519_MAX_BYTES;
  if (ec.length === 0 && ed.length > 0 && !edFits) {
    throw new HallmarkError('INPUT_TOO_LARGE', `the list is ${size} bytes; Ed25519 signatures are checked in memory up to ${ED25519_MAX_BYTES} bytes: sign larger lists with ECDSA P-256`);
  }
  const verifiers = ec.map(() => createVerify('sha256'));
  const hash = createHash('sha256');
  const whole: Buffer[] = [];
  for await (const chunk of fileChunks(path)) {
    hash.update(chunk);
    for (const v of verifiers) v.update(chunk);
    if (ed.length > 0 && edFits) whole.push(chunk);
  }
  const sha256 = hash.digest('hex');
  for (const [i, s] of ec.entries()) {
    let ok = false;
    try { ok = verifiers[i]!.verify({ key: s.key, dsaEncoding: isDer ? 'der' : 'ieee-p1363' }, signature); } catch { ok = false; }
    if (ok) return { signer: s, algorithm: 'ecdsa-p256-sha256', sha256 };
  }
  if (ed.length > 0 && edFits) {
    const data = Buffer.concat(whole);
    for (const s of ed) if (cryptoVerify(null, data, s.key, signature)) return { signer: s, algorithm: 'ed25519', sha256 };
  }
  throw invalid(`the detached signature does not verify over the file with any of the ${signers.length} --trust signer(s): the file was modified, or it was signed by a key not given with --trust`);
}

/** Signs the exact bytes of a file (for `hallmark manifest sign`): DER ECDSA P-256/SHA-256 or Ed25519. */
export async function signFile(path: string, key: KeyObject): Promise<{ signature: Buffer; algorithm: SignatureCheck['algorithm']; sha256: string }> {
  const hash = createHash('sha256');
  if (key.asymmetricKeyType === 'ec' && key.asymmetricKeyDetails?.namedCurve === 'prime256v1') {
    const signer = createSign('sha256');
    for await (const chunk of fileChunks(path)) { hash.update(chunk); signer.update(chunk); }
    return { signature: signer.sign({ key, dsaEncoding: 'der' }), algorithm: 'ecdsa-p256-sha256', sha256: hash.digest('hex') };
  }
  if (key.asymmetricKeyType === 'ed25519') {
    const size = (await stat(path)).size;
    if (size > ED25519_MAX_BYTES) throw new HallmarkError('INPUT_TOO_LARGE', `the list is ${size} bytes; Ed25519 signs in memory up to ${ED25519_MAX_BYTES} bytes: use an ECDSA P-256 key`);
    const data = await readFile(path);
    return { signature: cryptoSign(null, data, key), algorithm: 'ed25519', sha256: hash.update(data).digest('hex') };
  }
  throw new HallmarkError('UNSUPPORTED_ALGORITHM', `a manifest signing key must be EC P-256 or Ed25519, not ${key.asymmetricKeyType}${key.asymmetricKeyDetails?.namedCurve ? ' ' + key.asymmetricKeyDetails.namedCurve : ''}`);
}

// ------------------------------------------------------------------ lines

export interface Line { readonly line: number; readonly text: string }

/** Splits a byte stream into lines (LF or CRLF; a UTF-8 BOM is dropped). Empty lines are yielded too. */
export async function* lines(chunks: AsyncIterable<Buffer>): AsyncGenerator<Line> {
  let n = 0;
  let carry: Buffer | null = null;
  let first = true;
  for await (const chunk of chunks) {
    let buf: Buffer = carry ? Buffer.concat([carry, chunk]) : chunk;
    carry = null;
    if (first) {
      first = false;
      if (buf.length >= 3 && buf[0] === 0xef && buf[1] === 0xbb && buf[2] === 0xbf) buf = buf.subarray(3);
    }
    let start = 0;
    for (;;) {
      const nl = buf.indexOf(0x0a, start);
      if (nl < 0) break;
      n++;
      if (nl - start > MAX_LINE_BYTES) throw new HallmarkError('INPUT_TOO_LARGE', `line ${n} is over ${MAX_LINE_BYTES} bytes`);
      const end = nl > start && buf[nl - 1] === 0x0d ? nl - 1 : nl;
      yield { line: n, text: buf.toString('utf8', start, end) };
      start = nl + 1;
    }
    if (start < buf.length) {
      if (buf.length - start > MAX_LINE_BYTES) throw new HallmarkError('INPUT_TOO_LARGE', `line ${n + 1} is over ${MAX_LINE_BYTES} bytes`);
      carry = Buffer.from(buf.subarray(start));
    }
  }
  if (carry && carry.length > 0) {
    n++;
    const end = carry[carry.length - 1] === 0x0d ? carry.length - 1 : carry.length;
    yield { line: n, text: carry.toString('utf8', 0, end) };
  }
}

/** One CSV record on one line (RFC 4180 quoting; a quoted field may not span lines). */
export function splitCsvLine(text: string): string[] {
  const fields: string[] = [];
  let i = 0;
  for (;;) {
    if (text[i] === '"') {
      let value = '';
      i++;
      for (;;) {
        const q = text.indexOf('"', i);
        if (q < 0) throw new EntryError(`unterminated quoted field (a field may not span lines)`);
        value += text.slice(i, q);
        if (text[q + 1] === '"') { value += '"'; i = q + 2; continue; }
        i = q + 1;
        break;
      }
      fields.push(value);
      if (i < text.length && text[i] !== ',') throw new EntryError(`unexpected character after a quoted field at column ${i + 1}`);
    } else {
      const c = text.indexOf(',', i);
      const end = c < 0 ? text.length : c;
      fields.push(text.slice(i, end).trim());
      i = end;
    }
    if (i >= text.length) break;
    i++; // the comma
    if (i === text.length) { fields.push(''); break; }
  }
  return fields;
}

// ------------------------------------------------------------------ entries

export interface ListOptions {
  readonly ignoreBirthCertificates: boolean;
  readonly checkBirth: BirthCheck;
}

const PEM_ONE_LINE = /^-----BEGIN ([A-Z ]+)-----([A-Za-z0-9+/=\s]+)-----END \1-----$/;

function decodeDerField(value: string, what: string, label: string, udid?: string): Buffer {
  const pem = PEM_ONE_LINE.exec(value);
  if (pem) {
    if (pem[1] !== label) throw new EntryError(`${what} is a PEM ${pem[1]}, expected ${label}`, udid);
    return decodeBase64(pem[2]!.replace(/\s/g, ''), what, udid);
  }
  if (value.startsWith('-----')) throw new EntryError(`${what} is not a one-line PEM ${label} (the list is line-based: remove the newlines, or give base64 DER)`, udid);
  return decodeBase64(value, what, udid);
}

const TENANT = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

async function listDevice(get: (f: Field) => string | undefined, options: ListOptions): Promise<ManifestDevice> {
  const explicitRaw = get('explicit_udid');
  const udidRaw = get('udid');
  const hint = (explicitRaw || udidRaw || '').toLowerCase().slice(0, 64) || undefined;
  if (explicitRaw !== undefined && udidRaw !== undefined) throw new EntryError('give udid or explicit_udid, not both', hint);
  const keyText = get('public_key');
  if (!keyText) throw new EntryError(keyText === undefined ? 'missing field "public_key"' : 'public_key is empty', hint);
  const spki = importSpki(decodeDerField(keyText, 'public_key', 'PUBLIC KEY', hint), hint);
  const keyHash = createHash('sha256').update(spki).digest('hex');
  let udid = keyHash;
  if (explicitRaw !== undefined) {
    if (!explicitRaw) throw new EntryError('explicit_udid is empty', hint);
    udid = checkUdid(explicitRaw, 'explicit_udid', hint);
  } else if (udidRaw) {
    const given = checkUdid(udidRaw, 'udid', hint);
    if (given !== keyHash) throw new EntryError(`udid ${given} does not match the public key (its SHA-256 is ${keyHash}); vendor-assigned UDIDs go in an explicit_udid column`, given);
  }
  const device: { publicKeySpki: Buffer; udid: string; serialNumber?: string; tenant?: string; birthCertificate?: Buffer; birthCertificateChain?: Buffer[] } = { publicKeySpki: spki, udid };
  const serial = get('serial');
  if (serial) device.serialNumber = checkSerial(serial, udid);
  const tenant = get('tenant');
  if (tenant) {
    if (!TENANT.test(tenant)) throw new EntryError(`tenant ${JSON.stringify(tenant.slice(0, 80))} is not 1-63 letters, digits, dot, dash or underscore`, udid);
    device.tenant = tenant;
  }
  const birth = get('birth_cert');
  const chainText = get('birth_chain');
  if (!options.ignoreBirthCertificates && birth) {
    const cert = decodeDerField(birth, 'birth_cert', 'CERTIFICATE', udid);
    const chain = chainText ? chainText.split(/\s+/).filter(Boolean).map((c, i) => decodeBase64(c, `birth_chain[${i}]`, udid)) : [];
    checkCertificateKey(cert, spki, udid);
    await birthChecked(options.checkBirth, cert, chain, spki, udid);
    device.birthCertificate = cert;
    device.birthCertificateChain = chain;
  } else if (!options.ignoreBirthCertificates && chainText) {
    throw new EntryError('birth_chain is given without birth_cert', udid);
  }
  return device;
}

const where = (line: number, udid?: string): string => `line ${line}${udid ? ` (udid ${udid})` : ''}`;

/** Entries of a CSV list. A header without a required column is fatal (MANIFEST_INVALID naming it). */
export async function* csvEntries(source: AsyncIterable<Line>, options: ListOptions): AsyncGenerator<ParsedEntry> {
  let columns: Field[] | null = null;
  let index: Map<Field, number> = new Map();
  for await (const { line, text } of source) {
    if (text.trim() === '') continue;
    if (!columns) {
      let names: string[];
      try { names = splitCsvLine(text).map((c) => c.trim().toLowerCase()); } catch (err) { throw invalid(`line ${line} (the header): ${(err as Error).message}`); }
      const dup = names.find((n, i) => names.indexOf(n) !== i);
      if (dup) throw invalid(`line ${line} (the header): column ${JSON.stringify(dup)} appears twice`);
      const missing = [
        ...(names.includes('udid') || names.includes('explicit_udid') ? [] : ['"udid" (or "explicit_udid")']),
        ...(['public_key', 'serial'] as const).filter((c) => !names.includes(c)).map((c) => `"${c}"`),
      ];
      if (missing.length) throw invalid(`line ${line} (the header): missing column ${missing.join(', ')}; the header names ${names.map((n) => JSON.stringify(n)).join(', ')}`);
      if (names.includes('udid') && names.includes('explicit_udid')) throw invalid(`line ${line} (the header): give a udid or an explicit_udid column, not both`);
      const unknown = names.filter((n) => !(LIST_FIELDS as readonly string[]).includes(n));
      if (unknown.length) throw invalid(`line ${line} (the header): unknown column(s) ${unknown.map((u) => JSON.stringify(u)).join(', ')}; the columns are ${LIST_FIELDS.join(', ')}`);
      columns = names as Field[];
      index = new Map(columns.map((c, i) => [c, i]));
      continue;
    }
    let hint: string | undefined;
    try {
      const fields = splitCsvLine(text);
      const get = (f: Field): string | undefined => { const i = index.get(f); return i === undefined ? undefined : fields[i]; };
      hint = (get('explicit_udid') || get('udid') || '').toLowerCase().slice(0, 64) || undefined;
      if (fields.length !== columns.length) throw new EntryError(`${fields.length} field(s), the header has ${columns.length}`);
      const device = await listDevice(get, options);
      yield { ok: true, position: line, device };
    } catch (err) {
      const f = entryFailure('', err);
      if (!f.ok) yield { ...f, where: where(line, f.udid ?? hint) };
    }
  }
  if (!columns) throw invalid('the CSV list is empty (no header line)');
}

/** Entries of an NDJSON list: one JSON object per line; blank lines are ignored. */
export async function* ndjsonEntries(source: AsyncIterable<Line>, options: ListOptions): AsyncGenerator<ParsedEntry> {
  for await (const { line, text } of source) {
    if (text.trim() === '') continue;
    let hint: string | undefined;
    try {
      let obj: unknown;
      try { obj = JSON.parse(text); } catch (err) { throw new EntryError(`not valid JSON (${(err as Error).message})`); }
      if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) throw new EntryError('not a JSON object');
      const rec = obj as Record<string, unknown>;
      const unknown = Object.keys(rec).filter((k) => !(LIST_FIELDS as readonly string[]).includes(k));
      if (unknown.length) throw new EntryError(`unknown field(s) ${unknown.map((u) => JSON.stringify(u)).join(', ')}; the fields are ${LIST_FIELDS.join(', ')}`);
      for (const [k, v] of Object.entries(rec)) if (v !== null && typeof v !== 'string') throw new EntryError(`field "${k}" is not a string`);
      const get = (f: Field): string | undefined => (rec[f] === null ? undefined : (rec[f] as string | undefined));
      hint = (get('explicit_udid') || get('udid') || '').toLowerCase().slice(0, 64) || undefined;
      const device = await listDevice(get, options);
      yield { ok: true, position: line, device };
    } catch (err) {
      const f = entryFailure('', err);
      if (!f.ok) yield { ...f, where: where(line, f.udid ?? hint) };
    }
  }
}
