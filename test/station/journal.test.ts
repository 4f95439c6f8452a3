import assert from 'node:assert/strict';
import { createHash, sign as nodeSign } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { signCertificate, signingCa } from '../../src/authority/certificate-signer.js';
import { PROFILES } from '../../src/authority/profiles.js';
import { HallmarkError } from '../../src/errors.js';
import { parseCertificate } from '../../src/pki/certificate.js';
import { keyIdentifier } from '../../src/pki/extensions.js';
import { encodeNameString } from '../../src/pki/names.js';
import { JOURNAL_LIMITS, JournalWriter, encodeIssue, genesisHash, verifyJournal, type JournalProblemKind, type JournalVerification } from '../../src/station/journal.js';
import { deviceSubject, keySha256, type StationManifest } from '../../src/station/package.js';
import { makeTempDirSync } from '../helpers/tmp.js';
import { BASE, deviceCsr, makeRoot, makeStationCertificate, manifest, nodeStationKey, type TestCa } from './fixtures.js';

interface Built {
  readonly lines: string[];
  readonly text: string;
  readonly stationDer: Buffer;
  readonly root: TestCa;
  readonly manifest: StationManifest;
  readonly sign: (d: Buffer) => Promise<Buffer>;
}

const station = nodeStationKey();
const root = makeRoot();
const stationDer = makeStationCertificate({ issuer: root, stationSpki: station.spki });
const stationCert = parseCertificate(stationDer);
const ca = signingCa(stationCert.subject, keyIdentifier(station.spki), station.signer, stationCert.notAfter);
const subjectBase = encodeNameString(BASE);

async function deviceCert(spki: Buffer, udid: string, serialNumber: string | null = null, signer = ca): Promise<Buffer> {
  const signed = await signCertificate(signer, {
    profile: PROFILES.device, subject: deviceSubject(subjectBase, udid), subjectPublicKeyInfo: spki, subjectKeyKind: 'ecdsa-p256', validityDays: 30,
    altNames: { uri: [`urn:hallmark:udid:${udid}`, ...(serialNumber ? [`urn:hallmark:serial:${encodeURIComponent(serialNumber)}`] : [])] },
  });
  return signed.der;
}

/** A journal of `n` issuances (checkpoints after `checkpointAt` seqs and at the end unless `noFinalCheckpoint`). */
async function build(n: number, o: { checkpointAt?: number[]; noFinalCheckpoint?: boolean; devices?: StationManifest['devices'] } = {}): Promise<Built> {
  const dir = makeTempDirSync('hallmark-journal-');
  const path = join(dir, 'journal.jsonl');
  await JournalWriter.create(path, { stationId: 'st-1', batch: 'b-0001', station: stationDer });
  const w = await JournalWriter.open(path, stationDer);
  const sign = (d: Buffer) => station.signer.sign(d);
  const devices: { udid: string; serialNumber: string | null; publicKeySha256: string }[] = [];
  for (let seq = 1; seq <= n; seq++) {
    const { spki } = deviceCsr();
    const keyHash = keySha256(spki);
    const udid = o.devices !== undefined ? `${seq.toString(16).padStart(2, '0')}aa` : keyHash;
    const serialNumber = o.devices !== undefined ? `SN-${seq}` : null;
    devices.push({ udid, serialNumber, publicKeySha256: keyHash });
    const checkpoint = (o.checkpointAt ?? []).includes(seq) || (seq === n && !o.noFinalCheckpoint) ? { at: new Date().toISOString(), sign } : undefined;
    await w.append([{ at: new Date().toISOString(), udid, serialNumber, certificate: await deviceCert(spki, udid, serialNumber), keySha256: keyHash }], checkpoint);
  }
  await w.close();
  const text = await readFile(path, 'utf8');
  return { lines: text.split('\n').slice(0, -1), text, stationDer, root, manifest: manifest({ quota: 100, devices: o.devices !== undefined ? devices : null }), sign };
}

const join_ = (lines: string[]): string => lines.join('\n') + '\n';
const kinds = (v: JournalVerification): string[] => v.problems.map((p) => `${p.kind}@${p.seq}`);
const has = (v: JournalVerification, kind: JournalProblemKind, seq: number): boolean => v.problems.some((p) => p.kind === kind && p.seq === seq);
const obj = (line: string): Record<string, unknown> => JSON.parse(line) as Record<string, unknown>;
/** Recomputes an issue line's hash after it was changed (an editor who knows the format). */
function rehash(line: string): string {
  const o = obj(line);
  return encodeIssue({ seq: o.seq as number, at: o.at as string, udid: o.udid as string, serialNumber: o.serialNumber as string | null, certificate: o.certificate as string, prev: o.prev as string }).line;
}

describe('station journal', () => {
  let j: Built;
  before(async () => { j = await build(6, { checkpointAt: [3] }); });

  test('the format: header, canonical issue lines chained from the station certificate, signed checkpoints', () => {
    assert.equal(j.lines.length, 1 + 6 + 2);
    assert.deepEqual(Object.keys(obj(j.lines[0]!)), ['type', 'format', 'version', 'stationId', 'batch', 'station']);
    const first = obj(j.lines[1]!);
    assert.deepEqual(Object.keys(first), ['type', 'seq', 'at', 'udid', 'serialNumber', 'certificate', 'prev', 'hash']);
    assert.equal(first.prev, createHash('sha256').update(stationDer).digest('hex'));
    assert.equal(first.prev, genesisHash(stationDer));
    const { hash, ...rest } = first;
    assert.equal(hash, createHash('sha256').update(JSON.stringify(rest)).digest('hex'));
    const cp = obj(j.lines[4]!);
    assert.deepEqual(Object.keys(cp), ['type', 'seq', 'at', 'count', 'prev', 'hash', 'signature']);
    assert.equal(cp.seq, 3);
    assert.equal(cp.count, 3);
    assert.equal(cp.prev, obj(j.lines[3]!).hash);
    assert.equal(obj(j.lines[5]!).prev, cp.hash);
    for (const l of j.lines) assert.equal(JSON.stringify(JSON.parse(l)), l, 'canonical');
  });

  test('a clean journal verifies: every entry, no problem', async () => {
    const v = await verifyJournal(j.text, { stationCertificate: stationDer, trustedRoots: [root.der], manifest: j.manifest });
    assert.deepEqual(kinds(v), []);
    assert.deepEqual(v.entries.map((e) => e.seq), [1, 2, 3, 4, 5, 6]);
    assert.deepEqual(v.entries.map((e) => e.checkpointSeq), [3, 3, 3, 6, 6, 6]);
    assert.equal(v.lastCheckpoint?.seq, 6);
    const e = v.entries[0]!;
    assert.equal(e.udid, e.publicKeySha256);
    assert.equal(parseCertificate(e.certificate).serialHex.replace(/^00/, ''), e.certificateSerial);
    assert.match(e.subject, /CN=/);
    // The same from bytes and from a file path.
    assert.equal((await verifyJournal(Buffer.from(j.text))).entries.length, 6);
    const path = join(makeTempDirSync(), 'j.jsonl');
    await writeFile(path, j.text);
    assert.equal((await verifyJournal(path)).entries.length, 6);
  });

  test('an edited entry is reported, naming its seq, and is not trusted', async () => {
    const lines = [...j.lines];
    lines[5] = lines[5]!.replace(/"at":"[^"]+"/, '"at":"2020-01-01T00:00:00.000Z"'); // seq 4
    const v = await verifyJournal(join_(lines), { stationCertificate: stationDer });
    assert.ok(has(v, 'edited', 4), kinds(v).join(' '));
    assert.ok(!v.entries.some((e) => e.seq === 4));
    assert.deepEqual(v.entries.map((e) => e.seq), [1, 2, 3, 5, 6]);
  });

  test('an edited entry whose hash was recomputed breaks the chain at the next line', async () => {
    const lines = [...j.lines];
    lines[2] = rehash(lines[2]!.replace(/"at":"[^"]+"/, '"at":"2020-01-01T00:00:00.000Z"')); // seq 2
    const v = await verifyJournal(join_(lines), { stationCertificate: stationDer });
    assert.ok(has(v, 'edited', 2), kinds(v).join(' '));
    assert.ok(!v.entries.some((e) => e.seq <= 2), 'nothing before the break is trusted through it');
    assert.deepEqual(v.entries.map((e) => e.seq), [3, 4, 5, 6]);
  });

  test('a removed entry is a gap naming the missing seq', async () => {
    const lines = j.lines.filter((_, i) => i !== 6); // seq 5
    const v = await verifyJournal(join_(lines), { stationCertificate: stationDer });
    assert.ok(has(v, 'gap', 5), kinds(v).join(' '));
    assert.ok(!v.entries.some((e) => e.seq === 5));
    assert.deepEqual(v.entries.map((e) => e.seq), [1, 2, 3, 6]);
  });

  test('a duplicated line is reported once and the rest verifies', async () => {
    const lines = [...j.lines];
    lines.splice(3, 0, lines[2]!); // seq 2 twice
    const v = await verifyJournal(join_(lines), { stationCertificate: stationDer });
    assert.deepEqual(kinds(v), ['duplicate@2']);
    assert.deepEqual(v.entries.map((e) => e.seq), [1, 2, 3, 4, 5, 6]);
    // A journal replayed twice (concatenated): every line of the second copy is a duplicate.
    const twice = await verifyJournal(j.text + j.lines.slice(1).join('\n') + '\n', { stationCertificate: stationDer });
    assert.equal(twice.entries.length, 6);
    assert.equal(twice.problems.filter((p) => p.kind === 'duplicate').length, 8);
  });

  test('a forged checkpoint signature is reported; the entries it claims to cover are not trusted', async () => {
    const lines = [...j.lines];
    const cp = obj(lines[8]!);
    const other = nodeStationKey();
    const forged = nodeSign('sha256', Buffer.from(cp.hash as string, 'hex'), other.privateKey).toString('base64');
    lines[8] = lines[8]!.replace(/"signature":"[^"]+"/, `"signature":"${forged}"`);
    const v = await verifyJournal(join_(lines), { stationCertificate: stationDer });
    assert.ok(has(v, 'forged', 6), kinds(v).join(' '));
    assert.ok(has(v, 'unsigned', 4) && has(v, 'unsigned', 5) && has(v, 'unsigned', 6));
    assert.deepEqual(v.entries.map((e) => e.seq), [1, 2, 3]);
  });

  test('entries after the last checkpoint are reported as unsigned', async () => {
    const k = await build(4, { checkpointAt: [2], noFinalCheckpoint: true });
    const v = await verifyJournal(k.text, { stationCertificate: stationDer });
    assert.deepEqual(kinds(v), ['unsigned@3', 'unsigned@4']);
    assert.deepEqual(v.entries.map((e) => e.seq), [1, 2]);
  });

  test('an entry whose certificate the station did not sign is forged', async () => {
    const lines = j.lines.slice(0, 7); // up to seq 5, no final checkpoint
    const intruder = nodeStationKey();
    const intruderCa = signingCa(stationCert.subject, keyIdentifier(station.spki), intruder.signer, stationCert.notAfter);
    const { spki } = deviceCsr();
    const udid = keySha256(spki);
    const prev = obj(lines[6]!).hash as string;
    lines.push(encodeIssue({ seq: 6, at: new Date().toISOString(), udid, serialNumber: null, certificate: await deviceCert(spki, udid, null, intruderCa), prev }).line);
    const v = await verifyJournal(join_(lines), { stationCertificate: stationDer });
    assert.ok(has(v, 'forged', 6), kinds(v).join(' '));
    assert.ok(has(v, 'unsigned', 4));
  });

  test('over the quota, unknown devices and certificates that do not match their line', async () => {
    const over = await verifyJournal(j.text, { stationCertificate: stationDer, quota: 4 });
    assert.deepEqual(kinds(over), ['over-quota@5', 'over-quota@6']);
    assert.equal(over.entries.length, 4);

    const listed = await build(3, { devices: [] });
    const clean = await verifyJournal(listed.text, { stationCertificate: stationDer, manifest: listed.manifest });
    assert.deepEqual(kinds(clean), []);
    assert.equal(clean.entries[1]!.serialNumber, 'SN-2');
    const fewer = { ...listed.manifest, devices: listed.manifest.devices!.slice(1) };
    const v = await verifyJournal(listed.text, { stationCertificate: stationDer, manifest: fewer });
    assert.deepEqual(kinds(v), ['unknown-device@1']);
    // In "any key" mode the UDID must be the key's SHA-256.
    const anyKey = await verifyJournal(listed.text, { stationCertificate: stationDer, manifest: { ...listed.manifest, devices: null } });
    assert.deepEqual(kinds(anyKey), ['mismatch@1', 'mismatch@2', 'mismatch@3']);
  });

  test('another station, an untrusted root, a bad header', async () => {
    const other = makeStationCertificate({ issuer: root, stationSpki: nodeStationKey().spki });
    const v = await verifyJournal(j.text, { stationCertificate: other });
    assert.ok(has(v, 'header', 0));
    assert.equal(v.entries.length, 0);
    const untrusted = await verifyJournal(j.text, { trustedRoots: [makeRoot().der] });
    assert.ok(untrusted.problems.some((p) => p.kind === 'header' && /trusted root/.test(p.message)));
    assert.equal(untrusted.entries.length, 0);
    const wrongBatch = await verifyJournal(j.text, { manifest: { ...j.manifest, batch: 'b-9999' } });
    assert.ok(wrongBatch.problems.some((p) => p.kind === 'header' && /b-9999/.test(p.message)));
    const noHeader = await verifyJournal(join_(j.lines.slice(1)));
    assert.ok(has(noHeader, 'header', 0));
    assert.equal(noHeader.entries.length, 0);
    // Without its header but with the station certificate given, the lines still verify.
    const headless = await verifyJournal(join_(j.lines.slice(1)), { stationCertificate: stationDer });
    assert.deepEqual(kinds(headless), ['header@0']);
    assert.equal(headless.entries.length, 6);
    const empty = await verifyJournal(Buffer.alloc(0));
    assert.ok(has(empty, 'header', 0));
  });

  test('malformed, non-canonical and oversized lines are reported, never thrown', async () => {
    const lines = [...j.lines];
    lines.splice(2, 0, 'not json', '{"type":"issue"}', ' '.repeat(JOURNAL_LIMITS.lineBytes + 1), '{"type":"mystery","seq":9}');
    lines[7] = lines[7]!.replace('{"type":"issue",', '{"type": "issue",'); // seq 3 (lines moved by 4), not canonical
    const v = await verifyJournal(join_(lines), { stationCertificate: stationDer });
    assert.equal(v.problems.filter((p) => p.kind === "malformed").length, 5, kinds(v).join(" "));
    assert.ok(has(v, 'malformed', 3), kinds(v).join(' '));
    assert.ok(!v.problems.some((p) => p.kind === 'gap'), 'the malformed seq is not reported again as missing');
    assert.deepEqual(v.entries.map((e) => e.seq), [4, 5, 6]);
    await verifyJournal(Buffer.from([0xff, 0xfe, 0x0a, 0x00]));
  });

  test('a torn last line is reported, not fatal', async () => {
    const torn = j.text + j.lines[5]!.slice(0, 40);
    const v = await verifyJournal(torn, { stationCertificate: stationDer });
    assert.deepEqual(kinds(v), ['torn@4']);
    assert.equal(v.entries.length, 6);
  });

  test('throws only when the file cannot be read', async () => {
    await assert.rejects(verifyJournal('/nonexistent/journal.jsonl'), (e: unknown) => e instanceof HallmarkError && e.code === 'JOURNAL_INVALID');
  });
});

describe('JournalWriter', () => {
  test('cuts off a torn last line on open and carries on the chain', async () => {
    const k = await build(2);
    const dir = makeTempDirSync();
    const path = join(dir, 'journal.jsonl');
    await writeFile(path, k.text + '{"type":"issue","seq":3,"at":"20');
    const w = await JournalWriter.open(path, stationDer);
    assert.equal(w.repairedBytes, 32);
    assert.equal(w.state.lastSeq, 2);
    const { spki } = deviceCsr();
    await w.append([{ at: new Date().toISOString(), udid: keySha256(spki), serialNumber: null, certificate: await deviceCert(spki, keySha256(spki)), keySha256: keySha256(spki) }], { at: new Date().toISOString(), sign: k.sign });
    await w.close();
    const v = await verifyJournal(path, { stationCertificate: stationDer });
    assert.deepEqual(kinds(v), []);
    assert.equal(v.entries.length, 3);
  });

  test('refuses a damaged journal and another station\'s journal', async () => {
    const k = await build(3);
    const dir = makeTempDirSync();
    const path = join(dir, 'journal.jsonl');
    const lines = [...k.lines];
    lines.splice(2, 1);
    await writeFile(path, join_(lines));
    await assert.rejects(JournalWriter.open(path, stationDer), (e: unknown) => e instanceof HallmarkError && e.code === 'JOURNAL_INVALID' && /damaged at line 3/.test(e.message));
    await writeFile(path, k.text);
    const other = makeStationCertificate({ issuer: root, stationSpki: nodeStationKey().spki });
    await assert.rejects(JournalWriter.open(path, other), (e: unknown) => e instanceof HallmarkError && /another station/.test(e.message));
  });
});
