// Generic signed device lists (CSV and NDJSON with a detached signature) on SQLite and PostgreSQL.

import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, sign as cryptoSign } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { verifyAuditLog } from '../../../src/audit/audit-log.js';
import { HallmarkError, type ErrorCode } from '../../../src/errors.js';
import { addVendorCa } from '../../../src/registry/birth-certificates.js';
import { importManifest, type ImportOptions } from '../../../src/registry/manifests/import.js';
import { splitCsvLine } from '../../../src/registry/manifests/signed-list.js';
import { loadSigners, type ManifestSigner } from '../../../src/registry/manifests/signers.js';
import type { Store } from '../../../src/store/database.js';
import { forEachDialect } from '../../helpers/db.js';
import { openssl } from '../../pki/fixtures.js';
import { test } from 'node:test';
import {
  VECTORS, countAudit, countDevices, csvText, deviceKey, makeCertificate, makeIdentity, ndjsonText, registryWithBatch, signList, spkiOf, type ListRow,
} from './fixtures.js';

const ACTOR = 'cli:test';
const COLUMNS = ['udid', 'public_key', 'serial'];

const refused = (code: ErrorCode, pattern: RegExp) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${err instanceof Error ? err.stack : String(err)}`);
  assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
  assert.match(err.message, pattern);
  return true;
};

async function refusedWithoutTrace(store: Store, options: ImportOptions, code: ErrorCode, pattern: RegExp): Promise<void> {
  const before = [await countDevices(store), await countAudit(store)];
  await assert.rejects(importManifest(store, options), refused(code, pattern));
  assert.deepEqual([await countDevices(store), await countAudit(store)], before, 'a refused import wrote something');
}

const b64 = (d: Buffer): string => d.toString('base64');
const row = (k = deviceKey(), serial?: string): ListRow & { key: ReturnType<typeof deviceKey> } => ({ key: k, udid: k.udid, public_key: b64(k.spki), serial });

test('CSV lines: RFC 4180 quoting on one line', () => {
  assert.deepEqual(splitCsvLine('a,b,c'), ['a', 'b', 'c']);
  assert.deepEqual(splitCsvLine('a,,'), ['a', '', '']);
  assert.deepEqual(splitCsvLine('"x, ""y""",  z '), ['x, "y"', 'z']);
  assert.throws(() => splitCsvLine('"open'), /unterminated quoted field/);
  assert.throws(() => splitCsvLine('"a"b,c'), /after a quoted field/);
});

forEachDialect('signed device list import', async (t: TestContext, target) => {
  const store = await target.openStore();
  const { registry, batch, newBatch } = await registryWithBatch(store);
  const dir = target.dir;
  const producer = makeIdentity('O=Test Silicon, CN=Device List Signer');
  const producerPem = join(dir, 'producer.pem');
  writeFileSync(producerPem, producer.certPem);
  const signer: ManifestSigner[] = loadSigners(readFileSync(producerPem), producerPem);
  let n = 0;
  const file = (ext: string) => join(dir, `list-${++n}.${ext}`);

  await t.test('a CSV list signed ECDSA P-256 imports; the UDID is the key hash (given or computed); twice changes nothing', async () => {
    const rows = [row(), row(undefined, 'SN-0002'), { ...row(), udid: '' }, row(undefined, 'A, B (quoted)')];
    const path = file('csv');
    const content = csvText(COLUMNS, rows);
    signList(path, content, producer.privateKey);
    const report = await importManifest(store, { file: path, batch, signers: signer, actor: ACTOR });
    assert.equal(report.format, 'csv');
    assert.equal(report.fileSha256, createHash('sha256').update(content).digest('hex'));
    assert.deepEqual([report.entries, report.registered, report.unchanged], [4, 4, 0]);
    assert.deepEqual(report.signers.map((s) => s.name), ['O=Test Silicon, CN=Device List Signer']);
    const listed = (await registry.listDevices({ batch })).items;
    assert.deepEqual(listed.map((d) => d.udid), rows.map((r) => r.key.udid).sort());
    assert.equal(listed.find((d) => d.udid === rows[3]!.key.udid)!.serialNumber, 'A, B (quoted)');
    const summary = await store.db.selectFrom('audit_log').select('details').where('action', '=', 'manifest.import').where('target', '=', batch).executeTakeFirstOrThrow();
    assert.match(summary.details, new RegExp(`"fileSha256":"${report.fileSha256}","format":"csv"`));
    const before = [await countDevices(store), await countAudit(store)];
    const again = await importManifest(store, { file: path, batch, signers: signer, actor: ACTOR });
    assert.deepEqual([again.registered, again.unchanged], [0, 4]);
    assert.deepEqual([await countDevices(store), await countAudit(store)], before);
  });

  await t.test('an NDJSON list signed Ed25519 by a bare public key imports, with explicit UDIDs, PEM keys, Ed25519 and RSA device keys', async () => {
    const { privateKey: edSigner, publicKey } = generateKeyPairSync('ed25519');
    const pub = join(dir, 'ed.pub.pem');
    writeFileSync(pub, publicKey.export({ type: 'spki', format: 'pem' }));
    const k1 = deviceKey();
    const ed = spkiOf(generateKeyPairSync('ed25519').privateKey);
    const rsa = spkiOf(generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey);
    const rows: ListRow[] = [
      { explicit_udid: 'AA:BB:CC:00:11:22', public_key: b64(k1.spki), serial: 'E-1', tenant: 'acme' },
      { public_key: `-----BEGIN PUBLIC KEY-----${b64(ed)}-----END PUBLIC KEY-----` },
      { udid: createHash('sha256').update(rsa).digest('hex').toUpperCase(), public_key: rsa.toString('base64url') },
    ];
    const path = file('ndjson');
    signList(path, ndjsonText(rows), edSigner);
    const b = await newBatch();
    const report = await importManifest(store, { file: path, batch: b, signers: [...signer, ...loadSigners(readFileSync(pub), pub)], actor: ACTOR });
    assert.equal(report.format, 'ndjson');
    assert.equal(report.registered, 3);
    assert.deepEqual(report.signers.map((s) => s.name), ['public key']);
    const d = await registry.device('aabbcc001122');
    assert.equal(d.tenant, 'acme');
    assert.equal(d.publicKeySha256, k1.udid);
    await registry.device(createHash('sha256').update(ed).digest('hex'));
  });

  await t.test('the signature: a wrong signer, a file changed after signing, a truncated file, a missing .sig are refused before parsing', async () => {
    const path = file('csv');
    const content = csvText(COLUMNS, [row(), row()]);
    signList(path, content, producer.privateKey);
    const b = await newBatch();
    const other = makeIdentity('CN=Someone Else');
    const otherPem = join(dir, 'other.pem');
    writeFileSync(otherPem, other.certPem);
    await refusedWithoutTrace(store, { file: path, batch: b, signers: loadSigners(readFileSync(otherPem), otherPem), actor: ACTOR }, 'MANIFEST_INVALID',
      /does not verify over the file with any of the 1 --trust signer\(s\)/);
    writeFileSync(path, content.replace(/,\n/, ',X\n')); // one serial changed
    await refusedWithoutTrace(store, { file: path, batch: b, signers: signer, actor: ACTOR }, 'MANIFEST_INVALID', /does not verify over the file/);
    writeFileSync(path, content.slice(0, content.length - 10)); // truncated
    await refusedWithoutTrace(store, { file: path, batch: b, signers: signer, actor: ACTOR }, 'MANIFEST_INVALID', /does not verify over the file/);
    const lonely = file('csv');
    writeFileSync(lonely, content);
    await refusedWithoutTrace(store, { file: lonely, batch: b, signers: signer, actor: ACTOR }, 'MANIFEST_INVALID', /no signature: .*\.sig does not exist/);
    // A base64 text signature in a file named with --signature is accepted.
    const sigText = join(dir, 'detached.b64');
    writeFileSync(sigText, cryptoSign('sha256', Buffer.from(content), producer.privateKey).toString('base64') + '\n');
    assert.equal((await importManifest(store, { file: lonely, batch: b, signers: signer, signatureFile: sigText, actor: ACTOR })).registered, 2);
  });

  await t.test('a UDID that does not match its key is refused naming the line; --skip-invalid imports the rest', async () => {
    const rows = [row(), { ...row(), udid: deviceKey().udid }, row()];
    const path = file('csv');
    signList(path, csvText(COLUMNS, rows), producer.privateKey);
    const b = await newBatch();
    await refusedWithoutTrace(store, { file: path, batch: b, signers: signer, actor: ACTOR }, 'MANIFEST_INVALID',
      new RegExp(`^line 3 \\(udid ${rows[1]!.udid}\\): udid ${rows[1]!.udid} does not match the public key \\(its SHA-256 is ${rows[1]!.key.udid}\\)`));
    const report = await importManifest(store, { file: path, batch: b, signers: signer, skipInvalid: true, actor: ACTOR });
    assert.deepEqual([report.registered, report.invalidSkipped], [2, 1]);
    assert.equal(report.invalid[0]!.where, `line 3 (udid ${rows[1]!.udid})`);
  });

  await t.test('a CSV missing a column is refused naming it: the real Espressif list, and a list without serial', async () => {
    const espressif = readFileSync(join(VECTORS, 'espressif', 'manifest-espressif.csv'));
    const path = file('csv');
    signList(path, espressif, producer.privateKey);
    await refusedWithoutTrace(store, { file: path, batch: await newBatch(), signers: signer, actor: ACTOR }, 'MANIFEST_INVALID',
      /^line 1 \(the header\): missing column "udid" \(or "explicit_udid"\), "public_key", "serial"; the header names "mac", "cn", "cert"/);
    const noSerial = file('csv');
    signList(noSerial, csvText(['udid', 'public_key'], [row()]), producer.privateKey);
    await refusedWithoutTrace(store, { file: noSerial, batch: await newBatch(), signers: signer, actor: ACTOR }, 'MANIFEST_INVALID', /^line 1 \(the header\): missing column "serial"/);
    const extra = file('csv');
    signList(extra, csvText(['udid', 'public_key', 'serial', 'colour'], [row()]), producer.privateKey);
    await refusedWithoutTrace(store, { file: extra, batch: await newBatch(), signers: signer, actor: ACTOR }, 'MANIFEST_INVALID', /unknown column\(s\) "colour"/);
  });

  await t.test('bad lines are named by line number: field count, base64, a point off the curve, a duplicate key, NDJSON shape', async () => {
    const k = deviceKey();
    const off = Buffer.from(k.spki);
    off[90]! ^= 0x01;
    const dup = row();
    const good = [row(), row(), row()];
    const csv = [
      COLUMNS.join(','),
      `${good[0]!.udid},${good[0]!.public_key},S1`,
      `${dup.udid},${dup.public_key}`, // line 3: two fields
      `,not*base64,S3`, // line 4
      `,${b64(off)},S5`, // line 5: not on the curve
      '',
      `${good[1]!.udid},${good[1]!.public_key},S7`,
      `${dup.udid},${dup.public_key},S8`,
      `,${dup.public_key},S9`, // line 9: same key as line 8
      `${good[2]!.udid},${good[2]!.public_key},"S10`, // line 10: unterminated quote
    ].join('\r\n') + '\r\n';
    const path = file('csv');
    signList(path, csv, producer.privateKey);
    const b = await newBatch();
    await refusedWithoutTrace(store, { file: path, batch: b, signers: signer, actor: ACTOR }, 'MANIFEST_INVALID', new RegExp(`^line 3 \\(udid ${dup.udid}\\): 2 field\\(s\\), the header has 3`));
    const report = await importManifest(store, { file: path, batch: b, signers: signer, skipInvalid: true, actor: ACTOR });
    assert.deepEqual(report.invalid.map((e) => e.where.replace(/ \(.*/, '')), ['line 3', 'line 4', 'line 5', 'line 9', 'line 10']);
    assert.match(report.invalid[1]!.reason, /public_key is not base64/);
    assert.match(report.invalid[2]!.reason, /the public key is not a point on P-256/);
    assert.match(report.invalid[3]!.reason, /the same UDID as line 8/);
    assert.match(report.invalid[4]!.reason, /unterminated quoted field/);
    assert.deepEqual([report.registered, report.invalidSkipped], [3, 5]);

    const fresh = deviceKey();
    const nd = [
      JSON.stringify({ public_key: b64(fresh.spki) }),
      '{"public_key": ',
      JSON.stringify({ udid: dup.udid }),
      JSON.stringify({ public_key: dup.public_key, serial: 7 }),
      '[1]',
      JSON.stringify({ public_key: dup.public_key, colour: 'red' }),
    ].join('\n');
    const ndPath = file('ndjson');
    signList(ndPath, nd, producer.privateKey);
    const b2 = await newBatch();
    await refusedWithoutTrace(store, { file: ndPath, batch: b2, signers: signer, actor: ACTOR }, 'MANIFEST_INVALID', /^line 2: not valid JSON/);
    const r2 = await importManifest(store, { file: ndPath, batch: b2, signers: signer, skipInvalid: true, actor: ACTOR });
    assert.deepEqual(r2.invalid.map((e) => `${e.where}: ${e.reason}`.replace(/ \(.*?\)/, '')), [
      'line 2: not valid JSON',
      'line 3: missing field "public_key"',
      'line 4: field "serial" is not a string',
      'line 5: not a JSON object',
      'line 6: unknown field(s) "colour"; the fields are udid, explicit_udid, public_key, serial, birth_cert, birth_chain, tenant',
    ].map((s) => s.replace(/ \(.*?\)/, '')));
    assert.equal(r2.registered, 1);
    await registry.device(fresh.udid);
  });

  await t.test('birth certificates: from a trusted vendor stored; from an untrusted one or carrying another key, refused naming the line', async () => {
    const vendor = makeIdentity('O=List Vendor, CN=List Vendor Root', { ca: true });
    const sub = makeIdentity('O=List Vendor, CN=List Vendor Signer 01', { ca: true, issuer: vendor });
    const stranger = makeIdentity('O=Stranger, CN=Stranger Root', { ca: true });
    await addVendorCa(store, { vendor: 'list-vendor', pem: vendor.certPem, actor: ACTOR });
    const k1 = deviceKey();
    const k2 = deviceKey();
    const k3 = deviceKey();
    const rows: ListRow[] = [
      { udid: k1.udid, public_key: b64(k1.spki), serial: 'B1', birth_cert: b64(makeCertificate({ subject: 'CN=b1', spki: k1.spki, ca: false, issuer: sub })), birth_chain: b64(sub.certDer) },
      { udid: k2.udid, public_key: b64(k2.spki), serial: 'B2', birth_cert: b64(makeCertificate({ subject: 'CN=b2', spki: k2.spki, ca: false, issuer: stranger })) },
      { udid: k3.udid, public_key: b64(k3.spki), serial: 'B3', birth_cert: b64(makeCertificate({ subject: 'CN=b3', spki: k1.spki, ca: false, issuer: vendor })) },
    ];
    const path = file('csv');
    signList(path, csvText(['udid', 'public_key', 'serial', 'birth_cert', 'birth_chain'], rows), producer.privateKey);
    const b = await newBatch();
    await refusedWithoutTrace(store, { file: path, batch: b, signers: signer, actor: ACTOR }, 'BIRTH_CERT_INVALID',
      new RegExp(`^line 3 \\(udid ${k2.udid}\\): birth certificate does not chain to a trusted vendor CA \\(issuer O=Stranger, CN=Stranger Root`));
    const report = await importManifest(store, { file: path, batch: b, signers: signer, skipInvalid: true, actor: ACTOR });
    assert.deepEqual(report.invalid.map((e) => e.where), [`line 3 (udid ${k2.udid})`, `line 4 (udid ${k3.udid})`]);
    assert.match(report.invalid[1]!.reason, /does not carry the entry's public key/);
    assert.equal((await registry.device(k1.udid)).hasBirthCertificate, true);
  });

  await t.test('signatures made by openssl verify: ECDSA P-256 (dgst -sha256 -sign, DER) and Ed25519 (pkeyutl -rawin)', async () => {
    const path = file('csv');
    writeFileSync(path, csvText(COLUMNS, [row(), row()]));
    const ecKey = join(dir, 'ossl-ec.key');
    const ecPub = join(dir, 'ossl-ec.pub');
    const edKey = join(dir, 'ossl-ed.key');
    const edPub = join(dir, 'ossl-ed.pub');
    openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', ecKey]);
    openssl(['pkey', '-in', ecKey, '-pubout', '-out', ecPub]);
    openssl(['genpkey', '-algorithm', 'ed25519', '-out', edKey]);
    openssl(['pkey', '-in', edKey, '-pubout', '-out', edPub]);
    openssl(['dgst', '-sha256', '-sign', ecKey, '-out', `${path}.ec.sig`, path]);
    openssl(['pkeyutl', '-sign', '-rawin', '-inkey', edKey, '-in', path, '-out', `${path}.ed.sig`]);
    const b = await newBatch();
    const ec = await importManifest(store, { file: path, batch: b, signers: loadSigners(readFileSync(ecPub), ecPub), signatureFile: `${path}.ec.sig`, actor: ACTOR });
    assert.equal(ec.registered, 2);
    const ed = await importManifest(store, { file: path, batch: b, signers: loadSigners(readFileSync(edPub), edPub), signatureFile: `${path}.ed.sig`, actor: ACTOR });
    assert.equal(ed.unchanged, 2);
    // The two signatures are not interchangeable between signers.
    await refusedWithoutTrace(store, { file: path, batch: b, signers: loadSigners(readFileSync(edPub), edPub), signatureFile: `${path}.ec.sig`, actor: ACTOR }, 'MANIFEST_INVALID', /does not verify/);
  });

  await t.test('keys Hallmark does not accept for devices (secp256k1, RSA-1024) are invalid entries', async () => {
    const k1 = spkiOf(generateKeyPairSync('ec', { namedCurve: 'secp256k1' }).privateKey);
    const rsa = spkiOf(generateKeyPairSync('rsa', { modulusLength: 1024 }).privateKey);
    const path = file('ndjson');
    signList(path, ndjsonText([{ public_key: b64(k1) }, { public_key: b64(rsa) }, { public_key: b64(deviceKey().spki) }]), producer.privateKey);
    const report = await importManifest(store, { file: path, batch: await newBatch(), signers: signer, skipInvalid: true, actor: ACTOR });
    assert.deepEqual(report.invalid.map((e) => `${e.where}: ${e.reason}`), [
      'line 1: unsupported key ec secp256k1 (EC P-256, P-384, P-521, Ed25519 or RSA 2048-8192)',
      'line 2: unsupported key rsa 1024 (EC P-256, P-384, P-521, Ed25519 or RSA 2048-8192)',
    ]);
    assert.equal(report.registered, 1);
  });

  await t.test('a --format that does not fit the content is refused clearly', async () => {
    const path = file('csv');
    signList(path, csvText(COLUMNS, [row()]), producer.privateKey);
    await refusedWithoutTrace(store, { file: path, batch: await newBatch(), signers: signer, format: 'microchip', actor: ACTOR }, 'MANIFEST_INVALID', /a Microchip manifest is a JSON array/);
    await refusedWithoutTrace(store, { file: path, batch: await newBatch(), signers: signer, format: 'microchip', signatureFile: `${path}.sig`, actor: ACTOR }, 'BAD_REQUEST', /--signature is for CSV/);
    await refusedWithoutTrace(store, { file: path, batch: await newBatch(), signers: signer, format: 'ndjson', signatureFile: `${path}.sig`, actor: ACTOR }, 'MANIFEST_INVALID', /^line 1: not valid JSON/);
  });

  await t.test('the audit chain still verifies', async () => {
    const verdict = await verifyAuditLog(store.db);
    assert.ok(verdict.ok, JSON.stringify(verdict));
  });
});
