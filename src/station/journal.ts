// The factory station's journal: every certificate the offline station signs, hash-chained and
// signed by the station key, exported and imported online (hallmark station export / import).
//
// JSON Lines, UTF-8, one object per line, strictly canonical (JSON.stringify with the keys in the
// order below, no spaces), each line ending in "\n":
//
//   {"type":"header","format":"hallmark-station-journal","version":1,"stationId":…,"batch":…,"station":base64 DER of station.pem}
//   {"type":"issue","seq":N,"at":ISO,"udid":…,"serialNumber":string|null,"certificate":base64 DER,"prev":hex,"hash":hex}
//   {"type":"checkpoint","seq":N,"at":ISO,"count":N,"prev":hex,"hash":hex,"signature":base64}
//
// - seq of an issue: 1, 2, 3, … with no gap. seq of a checkpoint: the seq of the last issue it covers
//   (0 before the first); count: how many issues the journal holds up to it (= seq).
// - prev: the "hash" of the line before; for the first line after the header, hex SHA-256 of the
//   station certificate's DER (so the chain is bound to the station).
// - hash: hex SHA-256 of the canonical JSON of the object without "hash" (and, for a checkpoint,
//   without "signature").
// - signature: the station key's signature over the 32 hash bytes (the raw digest, not its hex),
//   X.509 encoding (DER ECDSA-Sig-Value; raw for Ed25519/RSA), scheme signingSchemeFor(key algorithm).
//
// A checkpoint authenticates every line before it through the chain. The station writes one at the end
// of every `station sign` run, after every 1,000 issuances, and at `station export`. Issuances after
// the last valid checkpoint are not trusted by verifyJournal (reported as 'unsigned').
//
// Durability (JournalWriter.append): the lines of a group are written with one write() on an O_APPEND
// descriptor and fdatasync()ed before the caller hands any of their certificates out. A crash can
// leave a torn last line (never handed out): the station cuts it off when it next opens the journal,
// and verifyJournal reports it as 'torn' without failing.

import { createHash, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { open as openFile, type FileHandle } from 'node:fs/promises';
import { FileOverLimit, readFileWithin, readFromStart } from '../files.js';
import { dirname } from 'node:path';
import { HallmarkError } from '../errors.js';
import { SCHEME_BY_OID, publicKeyFromSpki, signingSchemeFor } from '../pki/algorithms.js';
import { parseCertificate, sha256Fingerprint, type ParsedCertificate } from '../pki/certificate.js';
import { EXT, decodeBasicConstraints } from '../pki/extensions.js';
import { tlv } from '../pki/der.js';
import { nameToString } from '../pki/names.js';
import { verifyIssuedBy } from '../pki/verify.js';
import { checkStationCertificate, deviceSubject, encodeSubjectBase, keySha256, type StationManifest } from './package.js';

export const JOURNAL_FORMAT = 'hallmark-station-journal';
export const JOURNAL_VERSION = 1;

export const JOURNAL_LIMITS = {
  /** One line, newline excluded (an issue line is ~1 KB). */
  lineBytes: 64 * 1024,
  /** A whole journal file (~1 KB per issuance: half a million devices). */
  totalBytes: 512 * 1024 * 1024,
  /** The station writes a checkpoint at least this often. */
  checkpointEvery: 1000,
} as const;

export interface JournalHeader {
  readonly type: 'header';
  readonly format: typeof JOURNAL_FORMAT;
  readonly version: 1;
  readonly stationId: string;
  readonly batch: string;
  /** base64 DER of station.pem. */
  readonly station: string;
}

export interface IssueRecord {
  readonly type: 'issue';
  readonly seq: number;
  readonly at: string;
  readonly udid: string;
  readonly serialNumber: string | null;
  /** base64 DER. */
  readonly certificate: string;
  readonly prev: string;
  readonly hash: string;
}

export interface CheckpointRecord {
  readonly type: 'checkpoint';
  readonly seq: number;
  readonly at: string;
  readonly count: number;
  readonly prev: string;
  readonly hash: string;
  readonly signature: string;
}

// ---------------------------------------------------------------- encoding

const sha256Hex = (data: string | Buffer): string => createHash('sha256').update(data).digest('hex');

/** The prev of the first line after the header: hex SHA-256 of the station certificate DER. */
export const genesisHash = (stationDer: Buffer): string => sha256Hex(stationDer);

export function encodeHeader(h: { stationId: string; batch: string; station: Buffer }): string {
  return JSON.stringify({ type: 'header', format: JOURNAL_FORMAT, version: JOURNAL_VERSION, stationId: h.stationId, batch: h.batch, station: h.station.toString('base64') });
}

/** An issue line (no newline) and its hash. */
export function encodeIssue(f: { seq: number; at: string; udid: string; serialNumber: string | null; certificate: Buffer | string; prev: string }): { line: string; hash: string } {
  const body = issueBody(f);
  const hash = sha256Hex(body);
  return { line: `${body.slice(0, -1)},"hash":"${hash}"}`, hash };
}

/** The hashed part of an issue line: the canonical JSON without "hash". */
function issueBody(f: { seq: number; at: string; udid: string; serialNumber: string | null; certificate: Buffer | string; prev: string }): string {
  return JSON.stringify({ type: 'issue', seq: f.seq, at: f.at, udid: f.udid, serialNumber: f.serialNumber, certificate: typeof f.certificate === 'string' ? f.certificate : f.certificate.toString('base64'), prev: f.prev });
}

/** The hashed part of a checkpoint and its hash. */
export function checkpointBody(f: { seq: number; at: string; count: number; prev: string }): { body: string; hash: string } {
  const body = JSON.stringify({ type: 'checkpoint', seq: f.seq, at: f.at, count: f.count, prev: f.prev });
  return { body, hash: sha256Hex(body) };
}

/** A checkpoint line (no newline), signed over the 32 hash bytes by `sign` (a Signer's sign). */
export async function encodeCheckpoint(f: { seq: number; at: string; count: number; prev: string }, sign: (data: Buffer) => Promise<Buffer>): Promise<{ line: string; hash: string }> {
  const { body, hash } = checkpointBody(f);
  const signature = (await sign(Buffer.from(hash, 'hex'))).toString('base64');
  return { line: `${body.slice(0, -1)},"hash":"${hash}","signature":"${signature}"}`, hash };
}

// ---------------------------------------------------------------- line parsing

const ISO_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$/;
const HEX64 = /^[0-9a-f]{64}$/;
const UDID = /^(?:[0-9a-f]{2}){1,32}$/;
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
const utf8 = new TextDecoder('utf-8', { fatal: true });

type Parsed =
  | { readonly kind: 'header'; readonly value: JournalHeader }
  | { readonly kind: 'issue'; readonly value: IssueRecord; readonly body: string }
  | { readonly kind: 'checkpoint'; readonly value: CheckpointRecord; readonly body: string }
  | { readonly kind: 'bad'; readonly seq: number; readonly message: string };

const isSeq = (v: unknown, min: number): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= min;

/** Parses one line and checks its fields and canonical form (not its hash). */
function parseLine(raw: string): Parsed {
  let v: unknown;
  try {
    v = JSON.parse(raw);
  } catch {
    return { kind: 'bad', seq: 0, message: 'is not JSON' };
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return { kind: 'bad', seq: 0, message: 'is not a JSON object' };
  const o = v as Record<string, unknown>;
  const seq = isSeq(o.seq, 0) ? o.seq : 0;
  const bad = (message: string): Parsed => ({ kind: 'bad', seq, message });
  let canonical: string;
  if (o.type === 'header') {
    if (o.format !== JOURNAL_FORMAT) return bad(`is not a ${JOURNAL_FORMAT} header (format ${JSON.stringify(o.format)})`);
    if (o.version !== JOURNAL_VERSION) return bad(`is a journal of version ${JSON.stringify(o.version)}; this reads version ${JOURNAL_VERSION}`);
    if (typeof o.stationId !== 'string' || typeof o.batch !== 'string' || o.stationId.length > 128 || o.batch.length > 63) return bad('has a bad stationId or batch');
    if (typeof o.station !== 'string' || !BASE64.test(o.station) || o.station.length === 0) return bad('has no base64 station certificate');
    canonical = encodeHeader({ stationId: o.stationId, batch: o.batch, station: Buffer.from(o.station, 'base64') });
    if (canonical !== raw) return bad('is not in canonical form (keys in the contract order, no spaces, nothing else)');
    return { kind: 'header', value: o as unknown as JournalHeader };
  }
  if (o.type === 'issue') {
    if (!isSeq(o.seq, 1)) return bad('has no valid seq (a whole number from 1)');
    if (typeof o.at !== 'string' || !ISO_TIME.test(o.at) || Number.isNaN(Date.parse(o.at))) return bad(`seq ${seq}: "at" is not an ISO time`);
    if (typeof o.udid !== 'string' || !UDID.test(o.udid)) return bad(`seq ${seq}: "udid" is not 1-32 bytes of lowercase hex`);
    if (o.serialNumber !== null && (typeof o.serialNumber !== 'string' || o.serialNumber.length === 0 || o.serialNumber.length > 64)) return bad(`seq ${seq}: "serialNumber" must be null or 1-64 characters`);
    if (typeof o.certificate !== 'string' || o.certificate.length === 0 || !BASE64.test(o.certificate)) return bad(`seq ${seq}: "certificate" is not base64`);
    if (typeof o.prev !== 'string' || !HEX64.test(o.prev) || typeof o.hash !== 'string' || !HEX64.test(o.hash)) return bad(`seq ${seq}: "prev" and "hash" must be 64 lowercase hex digits`);
    const body = issueBody({ seq: o.seq, at: o.at, udid: o.udid, serialNumber: o.serialNumber as string | null, certificate: o.certificate, prev: o.prev });
    canonical = `${body.slice(0, -1)},"hash":"${o.hash}"}`;
    if (canonical !== raw) return bad(`seq ${seq} is not in canonical form (keys in the contract order, no spaces, nothing else)`);
    return { kind: 'issue', value: o as unknown as IssueRecord, body };
  }
  if (o.type === 'checkpoint') {
    if (!isSeq(o.seq, 0)) return bad('checkpoint has no valid seq');
    if (typeof o.at !== 'string' || !ISO_TIME.test(o.at) || Number.isNaN(Date.parse(o.at))) return bad(`checkpoint at seq ${seq}: "at" is not an ISO time`);
    if (!isSeq(o.count, 0)) return bad(`checkpoint at seq ${seq}: "count" is not a whole number`);
    if (typeof o.prev !== 'string' || !HEX64.test(o.prev) || typeof o.hash !== 'string' || !HEX64.test(o.hash)) return bad(`checkpoint at seq ${seq}: "prev" and "hash" must be 64 lowercase hex digits`);
    if (typeof o.signature !== 'string' || o.signature.length === 0 || o.signature.length > 2048 || !BASE64.test(o.signature)) return bad(`checkpoint at seq ${seq}: "signature" is not base64`);
    const { body } = checkpointBody({ seq: o.seq, at: o.at, count: o.count, prev: o.prev });
    canonical = `${body.slice(0, -1)},"hash":"${o.hash}","signature":"${o.signature}"}`;
    if (canonical !== raw) return bad(`checkpoint at seq ${seq} is not in canonical form (keys in the contract order, no spaces, nothing else)`);
    return { kind: 'checkpoint', value: o as unknown as CheckpointRecord, body };
  }
  return bad(`has an unknown type ${JSON.stringify(o.type)?.slice(0, 40)}`);
}


// ---------------------------------------------------------------- verification

export type JournalProblemKind =
  | 'malformed' // not a journal line: bad JSON, a missing or wrong field, not canonical, too long
  | 'torn' // the last line is incomplete (an interrupted write): ignored, not fatal
  | 'header' // missing or bad header, another station's journal, an untrusted station certificate
  | 'edited' // a line changed after it was written (its hash, or the next line's prev, does not match)
  | 'gap' // seq numbers missing (lines removed)
  | 'duplicate' // a line repeated, or a device / certificate signed twice
  | 'forged' // a checkpoint or a certificate not signed by the station key
  | 'unsigned' // an issuance not covered by a valid checkpoint
  | 'over-quota' // an issuance beyond the batch quota
  | 'unknown-device' // a key not in the package's device list
  | 'mismatch'; // a certificate that does not match its line (subject, UDID, SAN, CA flag)

export interface JournalProblem {
  /** The seq the problem is about (0 for the header or a line without a readable seq). */
  readonly seq: number;
  /** 1-based line number in the journal. */
  readonly line: number;
  readonly kind: JournalProblemKind;
  readonly message: string;
}

/** An issuance that passed every check and is covered by a valid checkpoint. */
export interface VerifiedIssue {
  readonly seq: number;
  readonly line: number;
  readonly at: string;
  readonly udid: string;
  readonly serialNumber: string | null;
  /** Certificate DER. */
  readonly certificate: Buffer;
  /** Certificate serial, lowercase hex as in the store (no sign byte). */
  readonly certificateSerial: string;
  readonly fingerprintSha256: string;
  readonly subject: string;
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** The device key (SPKI DER) and its hex SHA-256. */
  readonly publicKeySpki: Buffer;
  readonly publicKeySha256: string;
  readonly hash: string;
  /** The seq of the checkpoint that covers it. */
  readonly checkpointSeq: number;
}

export interface VerifyJournalOptions {
  /** The station certificate (DER or PEM) the journal must belong to; default: the one in the header. */
  readonly stationCertificate?: Buffer;
  /** Root certificates (DER): the station certificate must chain to one of them (through `chain`). */
  readonly trustedRoots?: readonly Buffer[];
  /** Certificates between the station certificate and the root, issuer first (DER). */
  readonly chain?: readonly Buffer[];
  /** The package manifest: stationId, batch, deviceSubjectBase, quota and the device list are checked. */
  readonly manifest?: StationManifest;
  /** Batch quota (overrides manifest.quota). */
  readonly quota?: number;
}

export interface JournalVerification {
  readonly header: JournalHeader | null;
  /** The station certificate the entries were checked against. */
  readonly station: ParsedCertificate | null;
  /** Trusted issuances, in seq order. */
  readonly entries: VerifiedIssue[];
  /** Everything wrong, in line order. Empty for a clean journal. */
  readonly problems: JournalProblem[];
  readonly lastCheckpoint: { readonly seq: number; readonly at: string; readonly hash: string; readonly line: number } | null;
  /** Issue lines read (well-formed ones). */
  readonly issueLines: number;
  readonly lines: number;
}

interface Candidate {
  readonly entry: Omit<VerifiedIssue, 'checkpointSeq'>;
  readonly signatureOk: Promise<boolean>;
}

function decodeCertificateArg(buf: Buffer): Buffer {
  const t = buf.toString('latin1');
  if (t.includes('-----BEGIN CERTIFICATE-----')) {
    const m = /-----BEGIN CERTIFICATE-----([\s\S]*?)-----END CERTIFICATE-----/.exec(t);
    if (m) return Buffer.from(m[1]!.replace(/\s+/g, ''), 'base64');
  }
  return buf;
}

/** The incremental verifier behind verifyJournal: feed lines in order, then finish(). */
class Verifier {
  readonly problems: JournalProblem[] = [];
  readonly entries: VerifiedIssue[] = [];
  header: JournalHeader | null = null;
  station: ParsedCertificate | null = null;
  lastCheckpoint: JournalVerification['lastCheckpoint'] = null;
  issueLines = 0;
  lines = 0;

  #stationKey: KeyObject | null = null;
  #subjectBase: Buffer | null = null;
  #expectedBase: Buffer | null = null;
  #stopped = false;
  #head: string | null = null;
  /** The head before the last line, when that line was a forged checkpoint (which may have been inserted). */
  #headBeforeForged: string | null = null;
  #lastSeq = 0;
  #lastSeqLine = 0;
  /** Seqs up to here were already reported missing or malformed. */
  #reportedUpTo = 0;
  #pending: Candidate[] = [];
  #all: Candidate[] = [];
  readonly #seenLines = new Map<string, number>();
  readonly #seenUdid = new Map<string, number>();
  readonly #seenKey = new Map<string, number>();
  readonly #seenSerial = new Map<string, number>();
  readonly #quota: number | undefined;
  readonly #devices: ReadonlyMap<string, { udid: string; serialNumber: string | null }> | null;
  readonly #listMode: boolean | undefined;

  constructor(private readonly options: VerifyJournalOptions) {
    this.#quota = options.quota ?? options.manifest?.quota;
    this.#listMode = options.manifest ? options.manifest.devices !== null : undefined;
    this.#devices = options.manifest?.devices ? new Map(options.manifest.devices.map((d) => [d.publicKeySha256, d])) : null;
    if (options.manifest) {
      try { this.#expectedBase = encodeSubjectBase(options.manifest.deviceSubjectBase); } catch { this.#expectedBase = null; }
    }
  }

  #problem(kind: JournalProblemKind, seq: number, line: number, message: string): void {
    this.problems.push({ kind, seq, line, message });
  }

  /** One complete line (without its newline). */
  line(raw: Buffer, lineNo: number): void {
    this.lines = lineNo;
    if (raw.length > JOURNAL_LIMITS.lineBytes) {
      this.#problem('malformed', 0, lineNo, `line ${lineNo} is ${raw.length} bytes, over the ${JOURNAL_LIMITS.lineBytes}-byte limit: ignored`);
      return;
    }
    let text: string;
    try {
      text = utf8.decode(raw);
    } catch {
      this.#problem('malformed', 0, lineNo, `line ${lineNo} is not UTF-8: ignored`);
      return;
    }
    const parsed = parseLine(text);
    if (lineNo === 1) {
      this.#onHeader(parsed, lineNo);
      // No header but a station certificate to check against: the first line is an ordinary line.
      if (parsed.kind === 'header' || parsed.kind === 'bad' || this.#stopped) return;
    }
    if (parsed.kind === 'bad') {
      this.#problem('malformed', parsed.seq, lineNo, `line ${lineNo} ${parsed.message}: ignored`);
      // The seq it claims is reported; a gap there is not reported again.
      if (parsed.seq > this.#lastSeq) this.#reportedUpTo = Math.max(this.#reportedUpTo, parsed.seq);
      return;
    }
    if (parsed.kind === 'header') {
      this.#problem('malformed', 0, lineNo, `line ${lineNo} is a second header: ignored`);
      return;
    }
    if (this.#stopped) return;
    // A line repeated word for word (a replay, a copy-paste) is reported once and skipped.
    const hash = parsed.value.hash;
    const first = this.#seenLines.get(hash);
    if (first !== undefined) {
      this.#problem('duplicate', parsed.value.seq, lineNo, `line ${lineNo} repeats line ${first} (${parsed.kind} seq ${parsed.value.seq}, same hash): ignored`);
      return;
    }
    this.#seenLines.set(hash, lineNo);
    if (parsed.kind === 'issue') this.#onIssue(parsed.value, sha256Hex(parsed.body), lineNo);
    else this.#onCheckpoint(parsed.value, sha256Hex(parsed.body), lineNo);
  }

  #onHeader(parsed: Parsed, lineNo: number): void {
    let stationDer: Buffer | null = null;
    if (parsed.kind !== 'header') {
      this.#problem('header', 0, lineNo, `line 1 is not a ${JOURNAL_FORMAT} header${parsed.kind === 'bad' ? ` (it ${parsed.message})` : ''}`);
    } else {
      this.header = parsed.value;
      stationDer = Buffer.from(parsed.value.station, 'base64');
      const m = this.options.manifest;
      if (m && (parsed.value.stationId !== m.stationId || parsed.value.batch !== m.batch)) {
        this.#problem('header', 0, lineNo, `the journal is from station ${JSON.stringify(parsed.value.stationId)} for batch ${JSON.stringify(parsed.value.batch)}, not station ${JSON.stringify(m.stationId)} for batch ${JSON.stringify(m.batch)}`);
      }
    }
    if (this.options.stationCertificate) {
      const trusted = decodeCertificateArg(this.options.stationCertificate);
      if (stationDer && !stationDer.equals(trusted)) {
        this.#problem('header', 0, lineNo, 'the journal names another station certificate than the one expected: it is checked against the expected one');
      }
      stationDer = trusted;
    }
    if (!stationDer) {
      this.#problem('header', 0, lineNo, 'no station certificate to check the journal against: nothing in it can be trusted');
      this.#stopped = true;
      return;
    }
    try {
      const cert = parseCertificate(stationDer);
      const facts = checkStationCertificate(cert, this.#expectedBase ?? undefined);
      this.station = cert;
      this.#subjectBase = facts.subjectBase;
      this.#stationKey = publicKeyFromSpki(cert.subjectPublicKeyInfo);
      this.#head = genesisHash(stationDer);
    } catch (err) {
      this.#problem('header', 0, lineNo, `the station certificate is not usable: ${(err as Error).message}`);
      this.#stopped = true;
      return;
    }
    if (this.options.trustedRoots) {
      const why = chainsToTrustedRoot(this.station, this.options.chain ?? [], this.options.trustedRoots);
      if (why) {
        this.#problem('header', 0, lineNo, `the station certificate ${why}: nothing in the journal can be trusted`);
        this.#stopped = true;
      }
    }
  }

  #dropPending(reason: string): void {
    for (const c of this.#pending) this.#problem('unsigned', c.entry.seq, c.entry.line, `seq ${c.entry.seq} is not covered by a valid checkpoint: ${reason}`);
    this.#pending = [];
  }

  #linked(prev: string): boolean {
    return prev === this.#head || (this.#headBeforeForged !== null && prev === this.#headBeforeForged);
  }

  /** Reports a broken link or gap before a line of seq `seq` (an issue, or the seq a checkpoint claims). */
  #checkPlace(seq: number, prev: string, lineNo: number, what: string): boolean {
    const linked = this.#linked(prev);
    if (seq > this.#lastSeq + 1 || (what === 'checkpoint' && seq > this.#lastSeq)) {
      const from = Math.max(this.#lastSeq, this.#reportedUpTo) + 1;
      const to = what === 'checkpoint' ? seq : seq - 1;
      if (from <= to) this.#problem('gap', from, lineNo, `${from === to ? `seq ${from} is` : `seq ${from}-${to} are`} missing before line ${lineNo} (removed from the journal?)`);
      this.#reportedUpTo = Math.max(this.#reportedUpTo, to);
    } else if (!linked) {
      const before = this.#lastSeq === 0 ? 'the station certificate (the journal start)' : `seq ${this.#lastSeq} (line ${this.#lastSeqLine})`;
      this.#problem('edited', this.#lastSeq, lineNo, `the ${what} at line ${lineNo} (seq ${seq}) does not chain to ${before}: that line was altered after it was written, or line ${lineNo} was replaced or moved`);
    }
    if (!linked) this.#dropPending(`the hash chain is broken before line ${lineNo}`);
    return linked;
  }

  #onIssue(r: IssueRecord, computedHash: string, lineNo: number): void {
    this.issueLines++;
    if (r.seq <= this.#lastSeq) {
      this.#problem('duplicate', r.seq, lineNo, `seq ${r.seq} at line ${lineNo} comes again after seq ${this.#lastSeq}: ignored`);
      return;
    }
    this.#checkPlace(r.seq, r.prev, lineNo, 'issue');
    const hashOk = computedHash === r.hash;
    this.#head = r.hash;
    this.#headBeforeForged = null;
    this.#lastSeq = r.seq;
    this.#lastSeqLine = lineNo;
    if (!hashOk) {
      this.#problem('edited', r.seq, lineNo, `seq ${r.seq} (line ${lineNo}) was altered after it was written: its hash does not match its content`);
      this.#dropPending(`the line of seq ${r.seq} after it was altered`);
      return;
    }
    const candidate = this.#checkIssue(r, lineNo);
    if (candidate) {
      this.#pending.push(candidate);
      this.#all.push(candidate);
    }
  }

  #checkIssue(r: IssueRecord, lineNo: number): Candidate | null {
    const mismatch = (kind: JournalProblemKind, message: string): null => { this.#problem(kind, r.seq, lineNo, `seq ${r.seq} (line ${lineNo}): ${message}`); return null; };
    let cert: ParsedCertificate;
    try {
      cert = parseCertificate(Buffer.from(r.certificate, 'base64'));
    } catch (err) {
      return mismatch('malformed', `the certificate cannot be parsed (${(err as Error).message})`);
    }
    const station = this.station!;
    if (!cert.issuer.equals(station.subject)) return mismatch('forged', 'the certificate is not issued by the station (issuer name differs)');
    const scheme = SCHEME_BY_OID.get(cert.signatureAlgorithmOid);
    if (!scheme) return mismatch('forged', `the certificate signature algorithm ${cert.signatureAlgorithmOid} is not one the station uses`);
    const bc = cert.extensions.get(EXT.basicConstraints);
    try {
      if (bc && decodeBasicConstraints(bc.value).ca) return mismatch('mismatch', 'the certificate is a CA certificate');
    } catch {
      return mismatch('malformed', 'the certificate has a malformed basicConstraints');
    }
    if (!cert.subject.equals(deviceSubject(this.#subjectBase!, r.udid))) return mismatch('mismatch', `the certificate subject ${safeName(cert.subject)} is not the batch's device subject with CN=${r.udid}`);
    const san = cert.extensions.get(EXT.subjectAltName)?.value;
    if (!san || !san.includes(tlv(0x86, Buffer.from(`urn:hallmark:udid:${r.udid}`, 'ascii')))) return mismatch('mismatch', `the certificate does not carry the URI urn:hallmark:udid:${r.udid}`);
    if (r.serialNumber !== null && !san.includes(tlv(0x86, Buffer.from(`urn:hallmark:serial:${encodeURIComponent(r.serialNumber)}`, 'ascii')))) return mismatch('mismatch', `the certificate does not carry the serial number ${r.serialNumber}`);
    const spki = Buffer.from(cert.subjectPublicKeyInfo);
    const keyHash = keySha256(spki);
    if (this.#listMode === false && r.udid !== keyHash) return mismatch('mismatch', `the UDID is not the SHA-256 of the certificate key (${keyHash})`);
    if (this.#devices) {
      const d = this.#devices.get(keyHash);
      if (!d) return mismatch('unknown-device', `the key ${keyHash} is not one of the batch's registered devices`);
      if (d.udid !== r.udid || d.serialNumber !== r.serialNumber) return mismatch('unknown-device', `the key ${keyHash} is registered as UDID ${d.udid} serial ${d.serialNumber ?? '(none)'}, not UDID ${r.udid} serial ${r.serialNumber ?? '(none)'}`);
    }
    const serial = cert.serialHex.replace(/^00(?=[0-9a-f])/, '');
    for (const [map, key, what] of [[this.#seenUdid, r.udid, `UDID ${r.udid}`], [this.#seenKey, keyHash, `device key ${keyHash}`], [this.#seenSerial, serial, `certificate serial ${serial}`]] as const) {
      const firstSeq = map.get(key);
      if (firstSeq !== undefined) return mismatch('duplicate', `${what} was already signed at seq ${firstSeq}`);
    }
    this.#seenUdid.set(r.udid, r.seq);
    this.#seenKey.set(keyHash, r.seq);
    this.#seenSerial.set(serial, r.seq);
    if (this.#quota !== undefined && r.seq > this.#quota) return mismatch('over-quota', `beyond the batch quota of ${this.#quota}`);
    const stationKey = this.#stationKey!;
    const signatureOk = new Promise<boolean>((resolve) => {
      cryptoVerify(scheme.hash, cert.tbs, stationKey, cert.signature, (err, ok) => resolve(!err && ok));
    });
    signatureOk.catch(() => {});
    return {
      signatureOk,
      entry: {
        seq: r.seq, line: lineNo, at: r.at, udid: r.udid, serialNumber: r.serialNumber, certificate: cert.der,
        certificateSerial: serial, fingerprintSha256: sha256Fingerprint(cert.der), subject: safeName(cert.subject),
        notBefore: cert.notBefore, notAfter: cert.notAfter, publicKeySpki: spki, publicKeySha256: keyHash, hash: r.hash,
      },
    };
  }

  #onCheckpoint(c: CheckpointRecord, computedHash: string, lineNo: number): void {
    if (c.seq < this.#lastSeq) {
      this.#problem('duplicate', c.seq, lineNo, `the checkpoint at line ${lineNo} claims seq ${c.seq}, but the journal is already at seq ${this.#lastSeq}: ignored`);
      return;
    }
    const linked = this.#checkPlace(c.seq, c.prev, lineNo, 'checkpoint');
    const coversAll = c.seq === this.#lastSeq;
    // The seqs it claims are there (the missing ones were reported): the next issue follows c.seq.
    if (c.seq > this.#lastSeq) {
      this.#lastSeq = c.seq;
      this.#lastSeqLine = lineNo;
    }
    if (computedHash !== c.hash) {
      this.#problem('edited', c.seq, lineNo, `the checkpoint at seq ${c.seq} (line ${lineNo}) was altered after it was written: its hash does not match its content`);
      this.#dropPending(`the checkpoint at line ${lineNo} was altered`);
      this.#head = c.hash;
      this.#headBeforeForged = null;
      return;
    }
    const scheme = signingSchemeFor(keyAlgorithmName(this.#stationKey!));
    let signatureOk = false;
    try {
      signatureOk = cryptoVerify(scheme.hash, Buffer.from(c.hash, 'hex'), this.#stationKey!, Buffer.from(c.signature, 'base64'));
    } catch {
      signatureOk = false;
    }
    if (!signatureOk) {
      this.#problem('forged', c.seq, lineNo, `the checkpoint at seq ${c.seq} (line ${lineNo}) is not signed by the station key`);
      this.#headBeforeForged = linked ? this.#head : null;
      this.#head = c.hash;
      return;
    }
    this.#head = c.hash;
    this.#headBeforeForged = null;
    if (c.count !== c.seq) {
      this.#problem('malformed', c.seq, lineNo, `the checkpoint at seq ${c.seq} (line ${lineNo}) counts ${c.count} issuances`);
      return;
    }
    if (!linked || !coversAll) return;
    for (const p of this.#pending) this.entries.push({ ...p.entry, checkpointSeq: c.seq });
    this.#pending = [];
    this.lastCheckpoint = { seq: c.seq, at: c.at, hash: c.hash, line: lineNo };
  }

  /** The incomplete last line of a file (no newline). */
  torn(raw: Buffer, lineNo: number): void {
    this.lines = lineNo;
    const m = /"seq":(\d{1,15})/.exec(raw.subarray(0, 200).toString('latin1'));
    const seq = m ? Number(m[1]) : this.#lastSeq + 1;
    this.#problem('torn', seq, lineNo, `the last line (line ${lineNo}, ${raw.length} bytes) is incomplete: a write was interrupted there; it is ignored (its certificate was never handed out)`);
  }

  async finish(): Promise<JournalVerification> {
    if (this.lines === 0) this.#problem('header', 0, 0, 'the journal is empty');
    for (const p of this.#pending) this.#problem('unsigned', p.entry.seq, p.entry.line, `seq ${p.entry.seq} (line ${p.entry.line}) comes after the last checkpoint: no station signature covers it (run hallmark station export on the station to sign it)`);
    this.#pending = [];
    const results = await Promise.all(this.#all.map((c) => c.signatureOk));
    const forged = new Set<number>();
    this.#all.forEach((c, i) => {
      if (!results[i]) {
        forged.add(c.entry.seq);
        this.#problem('forged', c.entry.seq, c.entry.line, `seq ${c.entry.seq} (line ${c.entry.line}): the certificate is not signed by the station key`);
      }
    });
    const entries = forged.size ? this.entries.filter((e) => !forged.has(e.seq)) : this.entries;
    const problems = this.problems.map((p, i) => ({ p, i })).sort((a, b) => a.p.line - b.p.line || a.i - b.i).map((x) => x.p);
    return { header: this.header, station: this.station, entries, problems, lastCheckpoint: this.lastCheckpoint, issueLines: this.issueLines, lines: this.lines };
  }
}

function keyAlgorithmName(key: KeyObject) {
  const type = key.asymmetricKeyType;
  const curve = key.asymmetricKeyDetails?.namedCurve;
  if (type === 'ed25519') return 'ed25519' as const;
  if (type === 'ec') return curve === 'secp384r1' ? 'ecdsa-p384' as const : 'ecdsa-p256' as const;
  return 'rsa-2048' as const; // every RSA size signs with SHA-256
}

function safeName(der: Buffer): string {
  try { return nameToString(der); } catch { return '(undecodable name)'; }
}

/** null when `station` chains to one of `roots` through `chain`, else why not. */
function chainsToTrustedRoot(station: ParsedCertificate, chain: readonly Buffer[], roots: readonly Buffer[]): string | null {
  try {
    const path = [station, ...chain.map((c) => parseCertificate(c))];
    for (let i = 0; i < path.length - 1; i++) verifyIssuedBy(path[i]!, path[i + 1]!);
    const top = path[path.length - 1]!;
    for (const r of roots) {
      if (r.equals(top.der)) return null;
      try {
        verifyIssuedBy(top, parseCertificate(r));
        return null;
      } catch {
        // try the next root
      }
    }
    return 'does not chain to a trusted root';
  } catch (err) {
    return `does not chain to a trusted root (${(err as Error).message})`;
  }
}

/** Verifies journal bytes. Never throws on journal content: every fault is a problem. */
export async function verifyJournalBuffer(buf: Buffer, options: VerifyJournalOptions = {}): Promise<JournalVerification> {
  if (buf.length > JOURNAL_LIMITS.totalBytes) throw new HallmarkError('JOURNAL_INVALID', `the journal is ${buf.length} bytes, over the ${JOURNAL_LIMITS.totalBytes}-byte limit`);
  const v = new Verifier(options);
  let start = 0;
  let lineNo = 0;
  let sinceYield = 0;
  while (start < buf.length) {
    const nl = buf.indexOf(0x0a, start);
    lineNo++;
    if (nl < 0) {
      v.torn(buf.subarray(start), lineNo);
      break;
    }
    v.line(buf.subarray(start, nl), lineNo);
    start = nl + 1;
    // Let queued certificate signature checks drain now and then (bounded memory, event loop alive).
    if (++sinceYield >= 2048) {
      sinceYield = 0;
      await new Promise((resolve) => setImmediate(resolve));
    }
  }
  return v.finish();
}

/**
 * Verifies a station journal: given as its text, its bytes, or a file path. Returns the trusted
 * issuances and every problem found (edited, removed, duplicated or forged lines, issuances after the
 * last checkpoint, over quota, ...), each naming its seq. Throws JOURNAL_INVALID only when the file
 * cannot be read or is over the size limit.
 */
export async function verifyJournal(input: string | Buffer, options: VerifyJournalOptions = {}): Promise<JournalVerification> {
  if (Buffer.isBuffer(input)) return verifyJournalBuffer(input, options);
  if (input.trimStart().startsWith('{')) return verifyJournalBuffer(Buffer.from(input, 'utf8'), options);
  return verifyJournalBuffer(await readJournalFile(input), options);
}

/** Reads a journal file whole, with the size limit checked before reading. */
export async function readJournalFile(path: string): Promise<Buffer> {
  try {
    return await readFileWithin(path, JOURNAL_LIMITS.totalBytes);
  } catch (err) {
    if (err instanceof FileOverLimit) throw new HallmarkError('JOURNAL_INVALID', `the journal ${path} is ${err.size} bytes, over the ${err.limit}-byte limit`);
    throw new HallmarkError('JOURNAL_INVALID', `cannot read the journal ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

// ---------------------------------------------------------------- writing (the station side)

/** Where a signed device key sits in the journal. */
export interface JournalIssueRef {
  readonly seq: number;
  readonly udid: string;
  /** Byte offset and length of its line. */
  readonly offset: number;
  readonly length: number;
}

export interface JournalState {
  readonly lastSeq: number;
  /** The hash the next line's prev must be. */
  readonly head: string;
  readonly lastCheckpoint: { readonly seq: number; readonly at: string } | null;
  /** Issue lines after the last checkpoint. */
  readonly sinceCheckpoint: number;
  readonly bytes: number;
}

const damaged = (path: string, lineNo: number, what: string): HallmarkError =>
  new HallmarkError('JOURNAL_INVALID', `the station journal ${path} is damaged at line ${lineNo}: ${what}. Sign nothing more: export it (hallmark station export) and send it to HQ`);

async function syncDirectory(dir: string): Promise<void> {
  let h: FileHandle | undefined;
  try {
    h = await openFile(dir, 'r');
    await h.sync();
  } catch {
    // Some file systems cannot fsync a directory; the file itself is synced.
  } finally {
    await h?.close();
  }
}

/** What the station needs from its own journal; checks hashes and links (not signatures). */
export interface OwnJournalScan {
  readonly lastSeq: number;
  readonly head: string;
  readonly lastCheckpoint: { seq: number; at: string } | null;
  readonly sinceCheckpoint: number;
  readonly byKey: Map<string, JournalIssueRef>;
  readonly byUdid: Map<string, number>;
}

/**
 * Reads the station's own journal (complete lines only: `buf` must end with a newline or be empty),
 * checking every hash and link. Throws JOURNAL_INVALID naming the first damaged line.
 */
export function scanOwnJournal(buf: Buffer, stationDer: Buffer, path: string): OwnJournalScan {
  const end = buf.length;
  let head = genesisHash(stationDer);
  let lastSeq = 0;
  let lastCheckpoint: { seq: number; at: string } | null = null;
  let sinceCheckpoint = 0;
  const byKey = new Map<string, JournalIssueRef>();
  const byUdid = new Map<string, number>();
  let start = 0;
  let lineNo = 0;
  while (start < end) {
    let nl = buf.indexOf(0x0a, start);
    if (nl < 0) nl = end;
    lineNo++;
    const raw = buf.subarray(start, nl);
    if (raw.length > JOURNAL_LIMITS.lineBytes) throw damaged(path, lineNo, 'the line is too long');
    const parsed = parseLine(raw.toString('utf8'));
    if (lineNo === 1) {
      if (parsed.kind !== 'header') throw damaged(path, 1, 'there is no journal header');
      if (!Buffer.from(parsed.value.station, 'base64').equals(stationDer)) throw new HallmarkError('JOURNAL_INVALID', `the journal ${path} belongs to another station certificate than station.pem`);
    } else if (parsed.kind === 'issue') {
      const r = parsed.value;
      if (r.seq !== lastSeq + 1 || r.prev !== head || sha256Hex(parsed.body) !== r.hash) throw damaged(path, lineNo, `seq ${r.seq} does not follow seq ${lastSeq}`);
      let spki: Buffer;
      try { spki = parseCertificate(Buffer.from(r.certificate, 'base64')).subjectPublicKeyInfo; } catch { throw damaged(path, lineNo, 'the certificate cannot be parsed'); }
      byKey.set(keySha256(spki), { seq: r.seq, udid: r.udid, offset: start, length: nl - start });
      byUdid.set(r.udid, r.seq);
      head = r.hash;
      lastSeq = r.seq;
      sinceCheckpoint++;
    } else if (parsed.kind === 'checkpoint') {
      const c = parsed.value;
      if (c.seq !== lastSeq || c.prev !== head || sha256Hex(parsed.body) !== c.hash) throw damaged(path, lineNo, `the checkpoint at seq ${c.seq} does not follow seq ${lastSeq}`);
      head = c.hash;
      lastCheckpoint = { seq: c.seq, at: c.at };
      sinceCheckpoint = 0;
    } else {
      throw damaged(path, lineNo, parsed.kind === 'bad' ? `the line ${parsed.message}` : 'a second header');
    }
    start = nl + 1;
  }
  if (lineNo === 0) throw damaged(path, 1, 'the journal is empty');
  return { lastSeq, head, lastCheckpoint, sinceCheckpoint, byKey, byUdid };
}

/**
 * The station's own journal file: append-only, each group of lines durable (fdatasync) before append()
 * returns. One writer at a time (the station holds a lock file).
 */
export class JournalWriter {
  readonly path: string;
  #handle: FileHandle;
  #lastSeq: number;
  #head: string;
  #lastCheckpoint: { seq: number; at: string } | null;
  #sinceCheckpoint: number;
  #bytes: number;
  /** Signed device keys (hex SHA-256 of the SPKI) and UDIDs. */
  readonly byKey: Map<string, JournalIssueRef>;
  readonly byUdid: Map<string, number>;
  /** Bytes of a torn last line cut off when the journal was opened (0 if none). */
  readonly repairedBytes: number;

  private constructor(path: string, handle: FileHandle, s: { lastSeq: number; head: string; lastCheckpoint: { seq: number; at: string } | null; sinceCheckpoint: number; bytes: number; byKey: Map<string, JournalIssueRef>; byUdid: Map<string, number>; repairedBytes: number }) {
    this.path = path;
    this.#handle = handle;
    this.#lastSeq = s.lastSeq;
    this.#head = s.head;
    this.#lastCheckpoint = s.lastCheckpoint;
    this.#sinceCheckpoint = s.sinceCheckpoint;
    this.#bytes = s.bytes;
    this.byKey = s.byKey;
    this.byUdid = s.byUdid;
    this.repairedBytes = s.repairedBytes;
  }

  /** Creates a journal holding only its header (fails if the file exists). */
  static async create(path: string, header: { stationId: string; batch: string; station: Buffer }): Promise<void> {
    const h = await openFile(path, 'wx', 0o644);
    try {
      await h.write(encodeHeader(header) + '\n');
      await h.sync();
    } finally {
      await h.close();
    }
    await syncDirectory(dirname(path));
  }

  /**
   * Opens the journal for appending: reads it through, checks its own chain (hashes and links, not
   * signatures: the station wrote them), and cuts off a torn last line. Throws JOURNAL_INVALID when
   * the journal is damaged or belongs to another station.
   */
  static async open(path: string, stationDer: Buffer): Promise<JournalWriter> {
    const handle = await openFile(path, 'r+').catch((err: NodeJS.ErrnoException) => {
      throw new HallmarkError('JOURNAL_INVALID', `cannot open the station journal ${path}: ${err.code ?? err.message}`);
    });
    try {
      const size = (await handle.stat()).size;
      if (size > JOURNAL_LIMITS.totalBytes) throw new HallmarkError('JOURNAL_INVALID', `the station journal ${path} is over the ${JOURNAL_LIMITS.totalBytes}-byte limit`);
      const buf = await readFromStart(handle, size);
      let end = buf.length;
      let repairedBytes = 0;
      if (end > 0 && buf[end - 1] !== 0x0a) {
        const lastNl = buf.lastIndexOf(0x0a, end - 1);
        const keep = lastNl + 1;
        repairedBytes = end - keep;
        await handle.truncate(keep);
        await handle.sync();
        end = keep;
      }
      const scan = scanOwnJournal(buf.subarray(0, end), stationDer, path);
      // Appends go to the end: reopen in append mode (O_APPEND) so every write lands there.
      await handle.close();
      const appendHandle = await openFile(path, 'a');
      return new JournalWriter(path, appendHandle, { ...scan, bytes: end, repairedBytes });
    } catch (err) {
      await handle.close().catch(() => {});
      throw err;
    }
  }

  get state(): JournalState {
    return { lastSeq: this.#lastSeq, head: this.#head, lastCheckpoint: this.#lastCheckpoint, sinceCheckpoint: this.#sinceCheckpoint, bytes: this.#bytes };
  }

  /**
   * Builds the lines of a group of issuances (seq lastSeq+1, …) and, when `checkpoint` is given, a
   * checkpoint after them; writes them with one write and fdatasync()s before returning. Nothing is
   * changed in memory if the write fails.
   */
  async append(issues: readonly { at: string; udid: string; serialNumber: string | null; certificate: Buffer; keySha256: string }[], checkpoint?: { at: string; sign: (data: Buffer) => Promise<Buffer> }): Promise<number[]> {
    let head = this.#head;
    let seq = this.#lastSeq;
    const parts: string[] = [];
    const refs: { key: string; ref: JournalIssueRef }[] = [];
    let offset = this.#bytes;
    for (const i of issues) {
      seq++;
      const { line, hash } = encodeIssue({ seq, at: i.at, udid: i.udid, serialNumber: i.serialNumber, certificate: i.certificate, prev: head });
      const length = Buffer.byteLength(line);
      refs.push({ key: i.keySha256, ref: { seq, udid: i.udid, offset, length } });
      offset += length + 1;
      parts.push(line);
      head = hash;
    }
    if (checkpoint) {
      const cp = await encodeCheckpoint({ seq, at: checkpoint.at, count: seq, prev: head }, checkpoint.sign);
      parts.push(cp.line);
      head = cp.hash;
    }
    if (parts.length === 0) return [];
    const data = Buffer.from(parts.join('\n') + '\n', 'utf8');
    await this.#handle.write(data);
    await this.#handle.datasync();
    this.#bytes += data.length;
    this.#head = head;
    this.#lastSeq = seq;
    for (const { key, ref } of refs) {
      this.byKey.set(key, ref);
      this.byUdid.set(ref.udid, ref.seq);
    }
    if (checkpoint) {
      this.#lastCheckpoint = { seq, at: checkpoint.at };
      this.#sinceCheckpoint = 0;
    } else {
      this.#sinceCheckpoint += issues.length;
    }
    return refs.map((r) => r.ref.seq);
  }

  /** The certificate (DER) of an issuance already in the journal. */
  async certificateAt(ref: JournalIssueRef): Promise<Buffer> {
    const h = await openFile(this.path, 'r');
    try {
      const buf = Buffer.alloc(ref.length);
      await h.read(buf, 0, ref.length, ref.offset);
      const parsed = parseLine(buf.toString('utf8'));
      if (parsed.kind !== 'issue' || parsed.value.seq !== ref.seq) throw damaged(this.path, 0, `the line of seq ${ref.seq} moved`);
      return Buffer.from(parsed.value.certificate, 'base64');
    } finally {
      await h.close();
    }
  }

  async close(): Promise<void> {
    await this.#handle.close();
  }
}
