// The stamp archive: many stamp files in one file, encrypted to the factory's key and signed by the
// issuing CA, for `hallmark stamp generate --encrypt-to FACTORY.pem` and `hallmark stamp open`.
//
// Encryption is RFC 9180 HPKE, base mode, DHKEM(P-256, HKDF-SHA256) + HKDF-SHA256 + AES-256-GCM
// (suite 0x0010 / 0x0001 / 0x0002): one key encapsulation per archive, then one HPKE context seals
// the chunks in order (HPKE's sequence number makes each chunk's nonce; reordering fails to open).
// HPKE base mode says nothing about who sent it, so the CA signs the whole archive: the factory
// accepts it only from a signer that chains to a root it trusts.
//
// Both sides stream: the writer holds at most one chunk (1 MiB) plus the file being added, the
// reader one chunk plus the file being read, however many files the archive holds.
//
// Layout (integers big-endian):
//
//   header
//     8   magic "HMSTARCH"
//     2   version (1)
//     4   length N of the rest of the header (at most 1 MiB)
//     N   2 KEM id (0x0010), 2 KDF id (0x0001), 2 AEAD id (0x0002)
//         2 length E (65), E bytes enc (the HPKE encapsulated key)
//         32 SHA-256 of the recipient's (factory's) public key, SubjectPublicKeyInfo DER
//         1 number C of signer certificates (1-8); C times: 4 length L (at most 64 KiB), L bytes DER;
//           the signer's certificate first, its root last
//         4 length I (at most 64 KiB), I bytes info: UTF-8 JSON object, or nothing when I = 0
//   chunks, one or more
//     1   flags: 0x01 on the last chunk, 0x00 on the others
//     4   length L of the ciphertext (16 to 1 MiB + 16)
//     L   HPKE seal of up to 1 MiB of the entry stream;
//         AAD = "hallmark stamp archive v1 chunk" 0x00 ‖ SHA-256(header) ‖ 8 chunk index ‖ 1 flags
//   trailer
//     8   magic "HMSTSIGN"
//     2   length S (at most 1024), S bytes signature by the first signer certificate's key over
//         "hallmark stamp archive v1 signature" 0x00 ‖ SHA-256(every byte before the trailer),
//         as X.509 carries it (DER ECDSA-Sig-Value, raw Ed25519); the file ends there.
//
//   The entry stream (the chunk plaintexts put end to end; entries may span chunks):
//     2 length of the name (1-255), the name (UTF-8: a plain file name, no "/", "\", "..", NUL or
//     control character), 4 length D of the data (at most 256 MiB), D bytes data; repeated.
//
// The AAD binds every chunk to this header (so chunks cannot be moved between archives), to its
// position, and to whether it is the last: an archive cut after any chunk has no last chunk and is
// refused even before the signature is checked.

import { createHash, createPublicKey, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { Aes256Gcm, CipherSuite, DhkemP256HkdfSha256, HkdfSha256, type RecipientContext } from '@hpke/core';
import { HallmarkError } from '../errors.js';
import type { Signer } from '../keys/key-backend.js';
import { keyAlgorithmOf, publicKeyFromSpki, signingSchemeFor } from '../pki/algorithms.js';
import { parseCertificate, sha256Fingerprint, type ParsedCertificate } from '../pki/certificate.js';
import { EXT, decodeBasicConstraints } from '../pki/extensions.js';
import { nameToString as decodeNameText } from '../pki/names.js';
import { verifyIssuedBy } from '../pki/verify.js';

export const ARCHIVE_MAGIC = Buffer.from('HMSTARCH', 'latin1');
export const ARCHIVE_TRAILER_MAGIC = Buffer.from('HMSTSIGN', 'latin1');
export const ARCHIVE_VERSION = 1;
/** HPKE suite: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM (RFC 9180 §7). */
export const HPKE_SUITE = { kem: 0x0010, kdf: 0x0001, aead: 0x0002 } as const;

export const ARCHIVE_LIMITS = {
  header: 1024 * 1024,
  enc: 133, // the largest NIST KEM's enc (P-521); P-256's is 65
  chainCertificates: 8,
  certificate: 64 * 1024,
  info: 64 * 1024,
  /** Plaintext bytes per chunk. */
  chunk: 1024 * 1024,
  signature: 1024,
  name: 255,
  /** One file in the archive: a batch summary CSV of a million devices is ~150 MB. */
  file: 256 * 1024 * 1024,
} as const;

const TAG_BYTES = 16;
const PREFIX_BYTES = 14; // magic, version, header length
const HPKE_INFO = Buffer.from('hallmark stamp archive v1', 'utf8');
const AAD_CONTEXT = Buffer.from('hallmark stamp archive v1 chunk\0', 'utf8');
const SIGNATURE_CONTEXT = Buffer.from('hallmark stamp archive v1 signature\0', 'utf8');
const LAST = 0x01;

function suite(): CipherSuite {
  return new CipherSuite({ kem: new DhkemP256HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes256Gcm() });
}

const invalid = (what: string, cause?: unknown) =>
  new HallmarkError('STAMP_ARCHIVE_INVALID', `stamp archive ${what}`, cause === undefined ? undefined : { cause });
const untrusted = (what: string) => new HallmarkError('STAMP_ARCHIVE_UNTRUSTED', `stamp archive ${what}`);

/** SHA-256 (hex) of a public key's SubjectPublicKeyInfo DER: how a factory key is named everywhere. */
export function factoryKeyFingerprint(key: Buffer | KeyObject): string {
  const spki = Buffer.isBuffer(key) ? createPublicKey({ key, format: 'der', type: 'spki' }) : key.type === 'public' ? key : createPublicKey(key);
  return createHash('sha256').update(spki.export({ type: 'spki', format: 'der' })).digest('hex');
}

function p256Public(spki: Buffer): KeyObject {
  let key: KeyObject;
  try { key = createPublicKey({ key: spki, format: 'der', type: 'spki' }); } catch (err) {
    throw new HallmarkError('BAD_REQUEST', 'the factory key is not a SubjectPublicKeyInfo public key', { cause: err });
  }
  if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
    throw new HallmarkError('BAD_REQUEST', `the factory key must be an EC P-256 key (hallmark stamp factory-key makes one), not ${key.asymmetricKeyType}${key.asymmetricKeyDetails?.namedCurve ? ' ' + key.asymmetricKeyDetails.namedCurve : ''}`);
  }
  return key;
}

/** Whether `name` is a plain file name that cannot escape the directory it is written into. */
export function checkEntryName(name: string): void {
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes === 0 || bytes > ARCHIVE_LIMITS.name) throw new HallmarkError('BAD_REQUEST', `archive file name must be 1-${ARCHIVE_LIMITS.name} bytes: ${JSON.stringify(name.slice(0, 64))}`);
  if (/[/\\\u0000-\u001f\u007f]/.test(name) || name === '.' || name.includes('..')) {
    throw new HallmarkError('BAD_REQUEST', `archive file name ${JSON.stringify(name)} is not a plain file name (no "/", "\\", "..", NUL or control characters)`);
  }
}

/** A name for messages; a certificate can parse with a name that does not decode (a flipped byte). */
function nameToString(der: Buffer): string {
  try { return decodeNameText(der); } catch { return `(undecodable name, sha256 ${createHash('sha256').update(der).digest('hex').slice(0, 16)})`; }
}

function u16(n: number): Buffer { const b = Buffer.alloc(2); b.writeUInt16BE(n); return b; }
function u32(n: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; }

function chunkAad(headerHash: Buffer, index: number, flags: number): Buffer {
  const tail = Buffer.alloc(9);
  tail.writeBigUInt64BE(BigInt(index), 0);
  tail[8] = flags;
  return Buffer.concat([AAD_CONTEXT, headerHash, tail]);
}

function isCa(cert: ParsedCertificate): boolean {
  const bc = cert.extensions.get(EXT.basicConstraints);
  try { return !!bc && decodeBasicConstraints(bc.value).ca; } catch { return false; }
}

function verifySignature(cert: ParsedCertificate, message: Buffer, signature: Buffer): boolean {
  const key = publicKeyFromSpki(cert.subjectPublicKeyInfo);
  // The scheme the authority's Signer uses for this kind of key (signingSchemeFor): SHA-256 for P-256
  // and RSA, SHA-384 for P-384, pure Ed25519.
  const scheme = signingSchemeFor(keyAlgorithmOf(key));
  try { return cryptoVerify(scheme.hash, message, key, signature); } catch { return false; }
}

// ---------------------------------------------------------------- writing

export interface ArchiveWriterOptions {
  readonly path: string;
  /** The factory's P-256 public key, SubjectPublicKeyInfo DER. */
  readonly recipientPublicKeySpki: Buffer;
  readonly signer: Signer;
  /** DER, the signer's certificate first, its root last. */
  readonly signerCertificateChain: readonly Buffer[];
  /** Shown by `stamp open` (batch, run, product...): not secret, not encrypted, but signed. */
  readonly info?: object;
}

export interface FinishedArchive {
  readonly files: number;
  readonly bytes: number;
  /** SHA-256 (hex) of the whole archive file. */
  readonly sha256: string;
}

export interface ArchiveWriter {
  /** Adds one file. Calls are serialised; await each (it applies back-pressure on the disk). */
  add(name: string, data: Buffer): Promise<void>;
  /**
   * Seals the last chunk, signs, fsyncs and renames PATH.partial to PATH. `beforePublish`, when given,
   * runs once the archive is complete and synced but before the rename (a caller records the archive's
   * hash durably there); if it fails, nothing is renamed.
   */
  finish(beforePublish?: (archive: FinishedArchive) => Promise<void>): Promise<FinishedArchive>;
  /** Removes PATH.partial; safe to call at any time and more than once. */
  abort(): Promise<void>;
}

/**
 * Starts an archive at `path + '.partial'` (created 0600; refused if it exists, since another run may
 * be writing it). Nothing appears at `path` until finish() has written, signed and synced everything.
 */
export async function createArchiveWriter(options: ArchiveWriterOptions): Promise<ArchiveWriter> {
  const recipient = p256Public(options.recipientPublicKeySpki);
  const recipientSpki = recipient.export({ type: 'spki', format: 'der' });
  const chain = options.signerCertificateChain;
  if (chain.length === 0 || chain.length > ARCHIVE_LIMITS.chainCertificates) throw new HallmarkError('BAD_REQUEST', `the signer chain must hold 1-${ARCHIVE_LIMITS.chainCertificates} certificates`);
  const parsed = chain.map((der, i) => {
    try { return parseCertificate(der); } catch (err) { throw new HallmarkError('BAD_REQUEST', `signer chain certificate ${i + 1} cannot be parsed: ${(err as Error).message}`, { cause: err }); }
  });
  const canonical = (spki: Buffer) => createPublicKey({ key: spki, format: 'der', type: 'spki' }).export({ type: 'spki', format: 'der' });
  if (!canonical(parsed[0]!.subjectPublicKeyInfo).equals(canonical(options.signer.publicKeySpki))) {
    throw new HallmarkError('BAD_REQUEST', 'the first signer certificate is not the certificate of the signing key');
  }
  const info = options.info === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(options.info), 'utf8');
  if (options.info !== undefined && (options.info === null || typeof options.info !== 'object' || Array.isArray(options.info))) throw new HallmarkError('BAD_REQUEST', 'archive info must be a JSON object');
  if (info.length > ARCHIVE_LIMITS.info) throw new HallmarkError('BAD_REQUEST', `archive info is over ${ARCHIVE_LIMITS.info} bytes`);

  const hpke = suite();
  const recipientKey = await hpke.kem.importKey('jwk', recipient.export({ format: 'jwk' }) as JsonWebKey, true);
  const sender = await hpke.createSenderContext({ recipientPublicKey: recipientKey, info: HPKE_INFO });
  const enc = Buffer.from(sender.enc);

  const body = Buffer.concat([
    u16(HPKE_SUITE.kem), u16(HPKE_SUITE.kdf), u16(HPKE_SUITE.aead),
    u16(enc.length), enc,
    createHash('sha256').update(recipientSpki).digest(),
    Buffer.from([chain.length]), ...chain.flatMap((der) => [u32(der.length), der]),
    u32(info.length), info,
  ]);
  const header = Buffer.concat([ARCHIVE_MAGIC, u16(ARCHIVE_VERSION), u32(body.length), body]);
  const headerHash = createHash('sha256').update(header).digest();

  const partial = `${options.path}.partial`;
  let fh: FileHandle;
  try {
    fh = await open(partial, 'wx', 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new HallmarkError('BAD_REQUEST', `${partial} exists: another run may be writing it (remove it if none is)`);
    throw err;
  }
  const signed = createHash('sha256'); // every byte before the trailer
  const whole = createHash('sha256'); // every byte of the file, for the caller's record
  let size = 0;
  let files = 0;
  let index = 0;
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let state: 'open' | 'finished' | 'aborted' | 'failed' = 'open';
  let queue: Promise<unknown> = Promise.resolve();

  const write = async (...parts: Buffer[]) => {
    for (const part of parts) {
      let done = 0;
      while (done < part.length) done += (await fh.write(part, done, part.length - done)).bytesWritten;
    }
    for (const part of parts) { whole.update(part); size += part.length; }
  };
  const writeSigned = async (...parts: Buffer[]) => {
    for (const part of parts) signed.update(part);
    await write(...parts);
  };
  const seal = async (plaintext: Buffer, last: boolean) => {
    const flags = last ? LAST : 0;
    const ciphertext = Buffer.from(await sender.seal(plaintext, chunkAad(headerHash, index, flags)));
    index++;
    await writeSigned(Buffer.from([flags]), u32(ciphertext.length), ciphertext);
  };
  // Seals whole 1 MiB chunks while at least that much is pending; the rest waits for more or for finish().
  const drain = async () => {
    if (pendingBytes < ARCHIVE_LIMITS.chunk) return;
    let all = Buffer.concat(pending, pendingBytes);
    pending = [];
    while (all.length >= ARCHIVE_LIMITS.chunk) {
      await seal(all.subarray(0, ARCHIVE_LIMITS.chunk), false);
      all = all.subarray(ARCHIVE_LIMITS.chunk);
    }
    if (all.length) pending = [Buffer.from(all)]; // a copy, so the big buffer can go
    pendingBytes = all.length;
  };
  // Serialises calls; a failure leaves the writer unusable (the caller aborts).
  const serial = <T>(fn: () => Promise<T>): Promise<T> => {
    const run = queue.then(async () => {
      if (state !== 'open') throw new HallmarkError('BAD_REQUEST', `the archive writer is ${state}`);
      try { return await fn(); } catch (err) { state = 'failed'; throw err; }
    });
    queue = run.catch(() => {});
    return run;
  };

  try {
    await writeSigned(header);
  } catch (err) {
    await fh.close().catch(() => {});
    await unlink(partial).catch(() => {});
    throw err;
  }

  return {
    add(name, data) {
      // Checked before the call is queued: a refused name or file leaves the writer usable.
      try {
        checkEntryName(name);
        if (!Buffer.isBuffer(data)) throw new HallmarkError('BAD_REQUEST', 'archive file data must be a Buffer');
        if (data.length > ARCHIVE_LIMITS.file) throw new HallmarkError('INPUT_TOO_LARGE', `archive file ${name} is ${data.length} bytes, over the ${ARCHIVE_LIMITS.file}-byte limit`);
      } catch (err) {
        return Promise.reject(err);
      }
      return serial(async () => {
        const nameBytes = Buffer.from(name, 'utf8');
        // Copied into the pending chunk, so the caller may reuse its buffer at once.
        pending.push(u16(nameBytes.length), nameBytes, u32(data.length), Buffer.from(data));
        pendingBytes += 6 + nameBytes.length + data.length;
        files++;
        await drain();
      });
    },
    finish(beforePublish) {
      return serial(async () => {
        await seal(Buffer.concat(pending, pendingBytes), true);
        pending = [];
        pendingBytes = 0;
        const message = Buffer.concat([SIGNATURE_CONTEXT, signed.digest()]);
        const signature = await options.signer.sign(message);
        // Checked before anything is renamed into place: a signer whose key is not the certificate's
        // (or a token that signs with another scheme) would otherwise ship an archive no factory opens.
        if (!verifySignature(parsed[0]!, message, signature)) throw new HallmarkError('KEY_BACKEND_FAILED', 'the archive signature does not verify with the signer certificate');
        if (signature.length > ARCHIVE_LIMITS.signature) throw new HallmarkError('KEY_BACKEND_FAILED', `the archive signature is ${signature.length} bytes, over ${ARCHIVE_LIMITS.signature}`);
        await write(ARCHIVE_TRAILER_MAGIC, u16(signature.length), signature);
        await fh.sync();
        await fh.close();
        const finished: FinishedArchive = { files, bytes: size, sha256: whole.digest('hex') };
        await beforePublish?.(finished);
        await publishArchive(options.path);
        state = 'finished';
        return finished;
      });
    },
    async abort() {
      await queue;
      if (state === 'finished' || state === 'aborted') return;
      state = 'aborted';
      pending = [];
      await fh.close().catch(() => {});
      await unlink(partial).catch(() => {});
    },
  };
}

/**
 * Renames a complete, synced PATH.partial to PATH and syncs the directory (the rename is durable only
 * then). Also how an interrupted stamp run publishes the archive it had finished (src/authority/stamping.ts).
 */
export async function publishArchive(path: string): Promise<void> {
  await rename(`${path}.partial`, path);
  try {
    const dir = await open(dirname(path), 'r');
    try { await dir.sync(); } finally { await dir.close(); }
  } catch { /* some file systems cannot fsync a directory; the data itself is synced */ }
}

/** SHA-256 (hex) of a file, read in chunks; null when it does not exist. */
export async function sha256OfFile(path: string): Promise<string | null> {
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  try {
    const hash = createHash('sha256');
    const buffer = Buffer.allocUnsafe(1 << 20);
    for (;;) {
      const { bytesRead } = await fh.read(buffer, 0, buffer.length, null);
      if (bytesRead === 0) break;
      hash.update(buffer.subarray(0, bytesRead));
    }
    return hash.digest('hex');
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------- reading

export interface ArchiveEntry { readonly name: string; readonly data: Buffer }

export interface ArchiveSummary {
  /** The info object the authority put in the header, or null. */
  readonly info: Record<string, unknown> | null;
  readonly signerSubject: string;
  readonly signerFingerprintSha256: string;
  /** The trusted root the signer chains to. */
  readonly rootSubject: string;
  readonly recipientKeySha256: string;
  readonly chunks: number;
  readonly bytes: number;
  /** SHA-256 (hex) of the whole archive file. */
  readonly sha256: string;
}

export interface StampArchive extends AsyncIterable<ArchiveEntry> {
  /**
   * The verification pass, run once (iteration runs it first too): structure, every length, the last
   * chunk present, the signature over the whole file, the signer chain to a trusted root, validity,
   * and the factory key. Reads the file once, holding one chunk at a time; decrypts nothing.
   */
  verify(): Promise<ArchiveSummary>;
}

export interface OpenArchiveOptions {
  readonly path: string;
  /** The factory's P-256 private key. */
  readonly recipientPrivateKey: KeyObject;
  /** DER certificates of the roots the archive's signer may chain to. */
  readonly trustedRoots: readonly Buffer[];
  /** Time at which the signer certificates must be valid; now by default. */
  readonly now?: Date;
}

interface Header {
  readonly bytes: Buffer;
  readonly hash: Buffer;
  readonly enc: Buffer;
  readonly recipientKeyHash: Buffer;
  readonly chain: ParsedCertificate[];
  readonly info: Record<string, unknown> | null;
}

/** Reads a file front to back with exact-length reads; a short read is a truncated archive. */
class FileReader {
  position = 0;
  constructor(readonly fh: FileHandle, readonly size: number) {}
  async exactly(length: number, what: string): Promise<Buffer> {
    if (length > this.size - this.position) throw invalid(`is truncated: ${what} needs ${length} bytes at offset ${this.position}, the file has ${this.size - this.position} left`);
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.fh.read(buf, done, length - done, this.position + done);
      if (bytesRead === 0) throw invalid(`is truncated: the file ended while reading ${what} (changed while being read?)`);
      done += bytesRead;
    }
    this.position += length;
    return buf;
  }
}

async function readHeader(reader: FileReader): Promise<Header> {
  if (reader.size < PREFIX_BYTES) {
    throw reader.size >= 8 && (await reader.exactly(8, 'magic')).equals(ARCHIVE_MAGIC)
      ? invalid(`is truncated: ${reader.size} bytes, shorter than a header`)
      : invalid('is not a Hallmark stamp archive (too short, no "HMSTARCH" magic)');
  }
  const prefix = await reader.exactly(PREFIX_BYTES, 'the header');
  if (!prefix.subarray(0, 8).equals(ARCHIVE_MAGIC)) throw invalid('is not a Hallmark stamp archive (no "HMSTARCH" magic)');
  const version = prefix.readUInt16BE(8);
  if (version !== ARCHIVE_VERSION) throw invalid(`has format version ${version}, this Hallmark reads version ${ARCHIVE_VERSION}`);
  const length = prefix.readUInt32BE(10);
  if (length > ARCHIVE_LIMITS.header) throw invalid(`header says it is ${length} bytes, over the ${ARCHIVE_LIMITS.header}-byte limit`);
  const body = await reader.exactly(length, 'the header');
  let at = 0;
  const take = (n: number, what: string): Buffer => {
    if (n > body.length - at) throw invalid(`header is malformed: ${what} runs past the end of the header`);
    const b = body.subarray(at, at + n);
    at += n;
    return b;
  };
  const kem = take(2, 'KEM id').readUInt16BE();
  const kdf = take(2, 'KDF id').readUInt16BE();
  const aead = take(2, 'AEAD id').readUInt16BE();
  if (kem !== HPKE_SUITE.kem || kdf !== HPKE_SUITE.kdf || aead !== HPKE_SUITE.aead) {
    throw invalid(`uses HPKE suite KEM 0x${kem.toString(16)} / KDF 0x${kdf.toString(16)} / AEAD 0x${aead.toString(16)}; only DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM is read`);
  }
  const encLength = take(2, 'enc length').readUInt16BE();
  if (encLength > ARCHIVE_LIMITS.enc) throw invalid(`header enc is ${encLength} bytes, over ${ARCHIVE_LIMITS.enc}`);
  const enc = Buffer.from(take(encLength, 'enc'));
  const recipientKeyHash = Buffer.from(take(32, 'recipient key hash'));
  const count = take(1, 'certificate count')[0]!;
  if (count === 0 || count > ARCHIVE_LIMITS.chainCertificates) throw invalid(`header has ${count} signer certificates (1-${ARCHIVE_LIMITS.chainCertificates})`);
  const chain: ParsedCertificate[] = [];
  for (let i = 1; i <= count; i++) {
    const len = take(4, `signer certificate ${i} length`).readUInt32BE();
    if (len > ARCHIVE_LIMITS.certificate) throw invalid(`signer certificate ${i} is ${len} bytes, over ${ARCHIVE_LIMITS.certificate}`);
    const der = Buffer.from(take(len, `signer certificate ${i}`));
    try { chain.push(parseCertificate(der)); } catch (err) { throw invalid(`signer certificate ${i} is not a DER certificate (${(err as Error).message})`, err); }
  }
  const infoLength = take(4, 'info length').readUInt32BE();
  if (infoLength > ARCHIVE_LIMITS.info) throw invalid(`info is ${infoLength} bytes, over ${ARCHIVE_LIMITS.info}`);
  let info: Record<string, unknown> | null = null;
  if (infoLength > 0) {
    const text = take(infoLength, 'info');
    try { info = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(text)); } catch (err) { throw invalid('info is not UTF-8 JSON', err); }
    if (info === null || typeof info !== 'object' || Array.isArray(info)) throw invalid('info is not a JSON object');
  }
  if (at !== body.length) throw invalid(`header has ${body.length - at} unexpected bytes at its end`);
  const bytes = Buffer.concat([prefix, body]);
  return { bytes, hash: createHash('sha256').update(bytes).digest(), enc, recipientKeyHash, chain, info };
}

/** Reads one chunk frame (flags, length) and its ciphertext. */
async function readChunk(reader: FileReader, index: number): Promise<{ flags: number; frame: Buffer; ciphertext: Buffer }> {
  if (reader.position === reader.size) throw invalid(`is truncated: it ends after ${index} chunks, without its last chunk`);
  const frame = await reader.exactly(5, `chunk ${index}`);
  const flags = frame[0]!;
  if (flags & ~LAST) throw invalid(`chunk ${index} has unknown flags 0x${flags.toString(16)}`);
  const length = frame.readUInt32BE(1);
  if (length < TAG_BYTES || length > ARCHIVE_LIMITS.chunk + TAG_BYTES) throw invalid(`chunk ${index} says it is ${length} bytes (${TAG_BYTES}-${ARCHIVE_LIMITS.chunk + TAG_BYTES})`);
  const ciphertext = await reader.exactly(length, `chunk ${index}`);
  return { flags, frame, ciphertext };
}

async function readTrailer(reader: FileReader): Promise<Buffer> {
  const magic = await reader.exactly(10, 'the signature trailer');
  if (!magic.subarray(0, 8).equals(ARCHIVE_TRAILER_MAGIC)) throw invalid('has no signature trailer after its last chunk');
  const length = magic.readUInt16BE(8);
  if (length === 0 || length > ARCHIVE_LIMITS.signature) throw invalid(`signature is ${length} bytes (1-${ARCHIVE_LIMITS.signature})`);
  const signature = await reader.exactly(length, 'the signature');
  if (reader.position !== reader.size) throw invalid(`has ${reader.size - reader.position} unexpected bytes after its signature`);
  return signature;
}

/** Checks the signer chain: each certificate issued by the next, CAs, all valid at `now`, ending at a trusted root. */
function verifySignerChain(chain: readonly ParsedCertificate[], roots: readonly ParsedCertificate[], now: Date): ParsedCertificate {
  const at = now.toISOString();
  const valid = (c: ParsedCertificate) => now >= c.notBefore && now <= c.notAfter;
  const issued = (c: ParsedCertificate, by: ParsedCertificate) => { try { verifyIssuedBy(c, by); return true; } catch { return false; } };
  const signer = chain[0]!;
  // The authority signs archives with the issuing CA's key; an end-entity certificate under the same
  // root (a device's, whose key may be in a stamp) must not be able to sign one.
  if (!isCa(signer)) throw untrusted(`signer ${nameToString(signer.subject)} is not a CA certificate`);
  for (let i = 0; i < chain.length; i++) {
    const cert = chain[i]!;
    const name = nameToString(cert.subject);
    if (!valid(cert)) throw untrusted(`signer certificate ${name} is not valid at ${at} (valid ${cert.notBefore.toISOString()} to ${cert.notAfter.toISOString()})`);
    const root = roots.find((r) => r.der.equals(cert.der)) ?? roots.find((r) => r.subject.equals(cert.issuer) && issued(cert, r));
    if (root) {
      if (!valid(root)) throw untrusted(`root ${nameToString(root.subject)} is not valid at ${at}`);
      return root;
    }
    const next = chain[i + 1];
    if (!next) throw untrusted(`signer does not chain to a trusted root (the chain ends at ${name}, issued by ${nameToString(cert.issuer)}, which is not among the --trust roots)`);
    if (!next.subject.equals(cert.issuer) || !issued(cert, next)) throw untrusted(`signer chain is broken: ${name} is not issued by the next certificate, ${nameToString(next.subject)}`);
    if (!isCa(next)) throw untrusted(`signer chain certificate ${nameToString(next.subject)} is not a CA`);
  }
  throw untrusted('signer does not chain to a trusted root');
}

/**
 * Opens a stamp archive for the factory. Nothing is read until verify() or iteration; iteration
 * verifies the whole archive first (and yields nothing from one that fails), then decrypts it chunk
 * by chunk. A file changed between the two passes is caught: the header must be the one verified,
 * every chunk must open under the verified key exchange, and the file must hash to the verified value.
 */
export function openArchive(options: OpenArchiveOptions): StampArchive {
  let verified: Promise<{ summary: ArchiveSummary; header: Header; signedHash: Buffer }> | undefined;
  const own = createPublicKey(options.recipientPrivateKey);
  if (options.recipientPrivateKey.type !== 'private' || own.asymmetricKeyType !== 'ec' || own.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
    throw new HallmarkError('STAMP_ARCHIVE_WRONG_KEY', 'the factory key must be an EC P-256 private key (hallmark stamp factory-key makes one)');
  }
  const ownHash = factoryKeyFingerprint(own);

  async function recipientContext(header: Header): Promise<RecipientContext> {
    const hpke = suite();
    const recipientKey = await hpke.kem.importKey('jwk', options.recipientPrivateKey.export({ format: 'jwk' }) as JsonWebKey, false);
    try {
      return await hpke.createRecipientContext({ recipientKey, enc: header.enc, info: HPKE_INFO });
    } catch (err) {
      throw invalid('key exchange (HPKE enc) cannot be opened with this factory key', err);
    }
  }

  async function verifyPass() {
    const roots = options.trustedRoots.map((der, i) => {
      try { return parseCertificate(der); } catch (err) { throw new HallmarkError('BAD_REQUEST', `trusted root ${i + 1} is not a DER certificate: ${(err as Error).message}`, { cause: err }); }
    });
    if (roots.length === 0) throw new HallmarkError('BAD_REQUEST', 'no trusted root given (the OEM\'s root certificate, --trust ROOT.pem)');
    const fh = await open(options.path, 'r');
    try {
      const reader = new FileReader(fh, (await fh.stat()).size);
      const header = await readHeader(reader);
      // Checked first: "made for another factory" is the likeliest mistake and needs no signature check to say.
      const madeFor = header.recipientKeyHash.toString('hex');
      if (madeFor !== ownHash) {
        throw new HallmarkError('STAMP_ARCHIVE_WRONG_KEY', `stamp archive is encrypted to factory key sha256:${madeFor}, not to this key (sha256:${ownHash})`);
      }
      const signed = createHash('sha256').update(header.bytes);
      const whole = createHash('sha256').update(header.bytes);
      let chunks = 0;
      for (;;) {
        const { flags, frame, ciphertext } = await readChunk(reader, chunks);
        signed.update(frame).update(ciphertext);
        whole.update(frame).update(ciphertext);
        chunks++;
        if (flags & LAST) break;
      }
      const signedHash = signed.digest();
      const trailerStart = reader.position;
      const signature = await readTrailer(reader);
      whole.update(await readAt(fh, trailerStart, reader.size - trailerStart));
      const signer = header.chain[0]!;
      let good: boolean;
      try { good = verifySignature(signer, Buffer.concat([SIGNATURE_CONTEXT, signedHash]), signature); } catch (err) {
        throw invalid(`signer certificate ${nameToString(signer.subject)} carries a key that cannot be used (${(err as Error).message})`, err);
      }
      if (!good) {
        throw invalid(`signature does not verify with the signer ${nameToString(signer.subject)}: the archive was changed after it was signed`);
      }
      const root = verifySignerChain(header.chain, roots, options.now ?? new Date());
      await recipientContext(header); // the key exchange opens with this key (decrypts nothing)
      const summary: ArchiveSummary = {
        info: header.info,
        signerSubject: nameToString(signer.subject),
        signerFingerprintSha256: sha256Fingerprint(signer.der),
        rootSubject: nameToString(root.subject),
        recipientKeySha256: madeFor,
        chunks,
        bytes: reader.size,
        sha256: whole.digest('hex'),
      };
      return { summary, header, signedHash };
    } finally {
      await fh.close();
    }
  }

  const verify = () => (verified ??= verifyPass());

  async function* entries(): AsyncGenerator<ArchiveEntry> {
    const { header, signedHash } = await verify();
    const fh = await open(options.path, 'r');
    try {
      const reader = new FileReader(fh, (await fh.stat()).size);
      const again = await reader.exactly(header.bytes.length, 'the header');
      if (!again.equals(header.bytes)) throw invalid('header changed after it was verified');
      const context = await recipientContext(header);
      const signed = createHash('sha256').update(header.bytes);
      // The entry stream: at most the entry being read plus one chunk is held.
      let buffered: Buffer = Buffer.alloc(0);
      let current: { name: string; length: number; parts: Buffer[]; have: number } | undefined;
      for (let index = 0; ; index++) {
        const { flags, frame, ciphertext } = await readChunk(reader, index);
        signed.update(frame).update(ciphertext);
        let plaintext: Buffer;
        try {
          plaintext = Buffer.from(await context.open(ciphertext, chunkAad(header.hash, index, flags)));
        } catch (err) {
          throw invalid(`chunk ${index} does not decrypt: the archive was changed or is not for this key`, err);
        }
        buffered = buffered.length ? Buffer.concat([buffered, plaintext]) : plaintext;
        for (;;) {
          if (current) {
            const want = current.length - current.have;
            const piece = buffered.subarray(0, want);
            if (piece.length) { current.parts.push(piece); current.have += piece.length; }
            buffered = buffered.subarray(piece.length);
            if (current.have < current.length) break;
            // A copy either way: a view would keep the whole chunk's plaintext alive.
            const data = current.parts.length === 1 ? Buffer.from(current.parts[0]!) : Buffer.concat(current.parts, current.length);
            const name = current.name;
            current = undefined;
            yield { name, data };
            continue;
          }
          if (buffered.length < 2) break;
          const nameLength = buffered.readUInt16BE(0);
          if (nameLength === 0 || nameLength > ARCHIVE_LIMITS.name) throw invalid(`chunk ${index} holds a file name of ${nameLength} bytes`);
          if (buffered.length < 2 + nameLength + 4) break;
          let name: string;
          try { name = new TextDecoder('utf-8', { fatal: true }).decode(buffered.subarray(2, 2 + nameLength)); } catch (err) { throw invalid(`chunk ${index} holds a file name that is not UTF-8`, err); }
          try { checkEntryName(name); } catch (err) { throw invalid(`holds an unsafe file name ${JSON.stringify(name)}`, err); }
          const length = buffered.readUInt32BE(2 + nameLength);
          if (length > ARCHIVE_LIMITS.file) throw invalid(`file ${name} is ${length} bytes, over the ${ARCHIVE_LIMITS.file}-byte limit`);
          current = { name, length, parts: [], have: 0 };
          buffered = buffered.subarray(2 + nameLength + 4);
        }
        if (flags & LAST) break;
      }
      if (current || buffered.length) throw invalid('ends inside a file (its last chunk is incomplete)');
      if (!signed.digest().equals(signedHash)) throw invalid('changed after it was verified');
    } finally {
      await fh.close();
    }
  }

  return { verify: async () => (await verify()).summary, [Symbol.asyncIterator]: () => entries() };
}

async function readAt(fh: FileHandle, position: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return buf.subarray(0, done);
}
