// Microchip manifest import on SQLite and PostgreSQL: the real Trust&GO / TrustFLEX / TNGLORA
// manifests (vectors/, from ../shared/vectors) with their real signers, and generated manifests for
// what the real ones cannot show (a point off the curve, a wrong signature of the right length, …).

import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { verifyAuditLog } from '../../../src/audit/audit-log.js';
import { HallmarkError, type ErrorCode } from '../../../src/errors.js';
import { addVendorCa } from '../../../src/registry/birth-certificates.js';
import { importManifest, type ImportOptions, type ImportReport } from '../../../src/registry/manifests/import.js';
import { deviceKeyOf } from '../../../src/registry/manifests/microchip.js';
import { loadSigners } from '../../../src/registry/manifests/signers.js';
import type { Store } from '../../../src/store/database.js';
import { forEachDialect } from '../../helpers/db.js';
import {
  MCHP, ROOT_CA_002, SIGNER_2, SIGNER_5, countAudit, countDevices, deviceKey, makeCertificate, makeIdentity, microchipEntry, microchipPayload,
  randomUniqueId, registryWithBatch, writeJson,
} from './fixtures.js';

const ACTOR = 'cli:test';
const TNGTLSU = join(MCHP, 'ECC608C-TNGTLSU-B.json');

const refused = (code: ErrorCode, pattern: RegExp) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${err instanceof Error ? err.stack : String(err)}`);
  assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
  assert.match(err.message, pattern);
  return true;
};

const signersFrom = (...files: string[]) => files.flatMap((f) => loadSigners(readFileSync(f), f));

/** uniqueIds of a manifest file, read independently of the importer (payloads decoded here). */
function uniqueIds(file: string): string[] {
  const entries = JSON.parse(readFileSync(file, 'utf8')) as { payload: string }[];
  return entries.map((e) => (JSON.parse(Buffer.from(e.payload, 'base64url').toString('utf8')) as { uniqueId: string }).uniqueId.toLowerCase());
}

async function snapshot(store: Store): Promise<{ devices: number; audit: number }> {
  return { devices: await countDevices(store), audit: await countAudit(store) };
}

/** Runs an import that must fail, and checks that nothing at all was written. */
async function refusedWithoutTrace(store: Store, options: ImportOptions, code: ErrorCode, pattern: RegExp): Promise<void> {
  const before = await snapshot(store);
  await assert.rejects(importManifest(store, options), refused(code, pattern));
  assert.deepEqual(await snapshot(store), before, 'a refused import wrote something');
}

forEachDialect('Microchip manifest import', async (t: TestContext, target) => {
  const store = await target.openStore();
  const { registry, batch, newBatch } = await registryWithBatch(store);
  const dir = target.dir;

  await t.test('without the vendor CA, the real TNGTLS manifest is refused naming entry 1: its x5c birth certificates cannot be checked', async () => {
    await refusedWithoutTrace(store, { file: TNGTLSU, batch, signers: signersFrom(SIGNER_5), actor: ACTOR }, 'BIRTH_CERT_INVALID',
      /^entry 1 \(uniqueId 0123f2408ea1fcf201\): birth certificate cannot be checked: no vendor CA is trusted.*hallmark vendor add.*--ignore-birth-certs/);
  });

  await t.test('the real ECC608C-TNGTLSU-B manifest imports with Manifest Signer 005, and its devices are listed by uniqueId', async () => {
    await addVendorCa(store, { vendor: 'microchip', pem: readFileSync(ROOT_CA_002, 'utf8'), actor: ACTOR });
    const auditBefore = await countAudit(store);
    const report = await importManifest(store, { file: TNGTLSU, batch, signers: signersFrom(SIGNER_2, SIGNER_5), actor: ACTOR });
    assert.equal(report.format, 'microchip');
    assert.equal(report.fileSha256, '1e4691f8604d8a1be3a39aebe1ffb4a75e22d6c69ab48f329d4b284a364b40d5'); // vectors/microchip/SOURCE.txt
    assert.deepEqual([report.entries, report.registered, report.unchanged, report.reRegistered, report.invalidSkipped], [10, 10, 0, 0, 0]);
    assert.deepEqual(report.signers.map((s) => s.name), ['O=Microchip Technology Inc, CN=Manifest Signer 005']);
    assert.deepEqual(report.warnings, []);
    const listed = await registry.listDevices({ batch });
    assert.deepEqual(listed.items.map((d) => d.udid), uniqueIds(TNGTLSU).sort());
    assert.ok(listed.items.every((d) => d.hasBirthCertificate && d.state === 'registered'));
    // The stored key is the kid "0" JWK, which is also the birth certificate's key.
    const first = JSON.parse(readFileSync(TNGTLSU, 'utf8'))[0] as { payload: string };
    const jwk = deviceKeyOf((JSON.parse(Buffer.from(first.payload, 'base64url').toString()) as { publicKeySet: { keys: unknown[] } }).publicKeySet.keys) as { x: string; y: string; kid: string };
    assert.equal(jwk.kid, '0');
    const row = await registry.deviceRow('0123f2408ea1fcf201');
    assert.equal(Buffer.from(row.public_key_spki).subarray(27, 59).toString('base64url'), jwk.x);
    assert.equal(Buffer.from(row.public_key_spki).subarray(59).toString('base64url'), jwk.y);
    // 10 device entries and one summary.
    assert.equal(await countAudit(store) - auditBefore, 11);
    const summary = await store.db.selectFrom('audit_log').selectAll().where('action', '=', 'manifest.import').orderBy('seq', 'desc').executeTakeFirstOrThrow();
    assert.equal(summary.target, batch);
    const details = JSON.parse(summary.details) as Record<string, unknown>;
    assert.equal(details.fileSha256, report.fileSha256);
    assert.equal(details.format, 'microchip');
    assert.equal(details.registered, 10);
    assert.equal((details.signers as { name: string }[])[0]!.name, 'O=Microchip Technology Inc, CN=Manifest Signer 005');
  });

  await t.test('importing the same manifest again changes nothing: every device unchanged, no row and no audit entry written', async () => {
    const before = await snapshot(store);
    const report = await importManifest(store, { file: TNGTLSU, batch, signers: signersFrom(SIGNER_5), actor: ACTOR });
    assert.deepEqual([report.registered, report.unchanged, report.reRegistered], [0, 10, 0]);
    assert.deepEqual(await snapshot(store), before);
  });

  await t.test('the same chips in another batch are clones: refused, nothing stored, the attempt audited with both batches', async () => {
    const other = await newBatch();
    const before = await countDevices(store);
    await assert.rejects(importManifest(store, { file: TNGTLSU, batch: other, signers: signersFrom(SIGNER_5), actor: ACTOR }),
      refused('CLONE_DETECTED', /^entry 1 \(uniqueId 0123f2408ea1fcf201\): .*another batch.*nothing was imported/));
    assert.equal(await countDevices(store), before);
    const clone = await store.db.selectFrom('audit_log').selectAll().where('action', '=', 'device.clone_refused').orderBy('seq', 'desc').executeTakeFirstOrThrow();
    assert.match(clone.details, new RegExp(`"batch":"${other}".*"existingBatch":"${batch}"`));
  });

  await t.test('every other real manifest imports with the signer VERIFY_RESULT.txt names (expired log signers are accepted with a warning)', async () => {
    const cases: [string, string, RegExp | null][] = [
      ['lorawan-stack/tnglora_B_valid.json', SIGNER_2, /Log Signer 002 expired on 2020-08-15/],
      ['lorawan-stack/tnglora_C_valid.json', SIGNER_2, /Log Signer 002 expired/],
      // x / y in padded standard base64 (a real quirk), signed by the test log signer.
      ['lorawan-stack/tnglora_MAHTN-T_logsignertest.json', join(MCHP, 'lorawan-stack', 'Log_Signer_Test.crt'), /Log Signer Test expired on 2019-02-18/],
      ['pytrustplatform/manifest_ATECC608A-MAH4I.json', SIGNER_2, /Log Signer 002 expired/],
      ['pytrustplatform/manifest.json', join(MCHP, 'pytrustplatform', 'dummy_signer-ca.crt'), null],
    ];
    for (const [file, signer, warning] of cases) {
      const b = await newBatch();
      const path = join(MCHP, file);
      const report = await importManifest(store, { file: path, batch: b, signers: signersFrom(SIGNER_5, signer), actor: ACTOR });
      const ids = uniqueIds(path);
      assert.equal(report.registered, ids.length, file);
      if (warning) assert.match(report.warnings.join('\n'), warning, file);
      else assert.deepEqual(report.warnings, [], file);
      assert.deepEqual((await registry.listDevices({ batch: b })).items.map((d) => d.udid), ids.sort(), file);
    }
    // The TNGLORA entry's only key is kid "1": with no kid "0", the first key is the device key.
    const lora = await registry.deviceRow('01237a005b08bcc527');
    assert.equal(Buffer.from(lora.public_key_spki).subarray(27, 59).toString('base64'), 'zsS63T2tTurSOa5vdUjidSE65RFsuX8Dc460BJfTMg4=');
  });

  await t.test('the real bad-signature manifest is refused, naming the entry and uniqueId, and stores nothing', async () => {
    const b = await newBatch();
    await refusedWithoutTrace(store, { file: join(MCHP, 'lorawan-stack', 'tnglora_B_badsig.json'), batch: b, signers: signersFrom(SIGNER_2), actor: ACTOR }, 'MANIFEST_INVALID',
      /^entry 1 \(uniqueId 01238ebe20080bd527\): the ES256 signature is 61 bytes; expected 64/);
    // The same tampering kept to the right length: the signature itself fails.
    const entries = JSON.parse(readFileSync(join(MCHP, 'lorawan-stack', 'tnglora_C_valid.json'), 'utf8')) as { signature: string }[];
    const sig = Buffer.from(entries[0]!.signature, 'base64url');
    sig[5]! ^= 0x01;
    entries[0]!.signature = sig.toString('base64url');
    const file = writeJson(dir, 'tampered.json', entries);
    await refusedWithoutTrace(store, { file, batch: b, signers: signersFrom(SIGNER_2), actor: ACTOR }, 'MANIFEST_INVALID',
      /^entry 1 \(uniqueId 0123114e171b98b427\): the signature does not verify with signer O=Microchip Technology Inc, CN=Log Signer 002/);
    // A changed payload (a substituted key) under the original signature fails too.
    const swapped = JSON.parse(readFileSync(join(MCHP, 'lorawan-stack', 'tnglora_C_valid.json'), 'utf8')) as { payload: string }[];
    const body = JSON.parse(Buffer.from(swapped[0]!.payload, 'base64url').toString()) as { publicKeySet: { keys: { x: string; y: string }[] } };
    const k = deviceKey();
    body.publicKeySet.keys[0]!.x = k.x;
    body.publicKeySet.keys[0]!.y = k.y;
    swapped[0]!.payload = Buffer.from(JSON.stringify(body)).toString('base64url');
    await refusedWithoutTrace(store, { file: writeJson(dir, 'swapped.json', swapped), batch: b, signers: signersFrom(SIGNER_2), actor: ACTOR }, 'MANIFEST_INVALID',
      /^entry 1 \(uniqueId 0123114e171b98b427\): the signature does not verify/);
  });

  await t.test('a manifest from an unknown signer is refused with the signer it names', async () => {
    const b = await newBatch();
    await refusedWithoutTrace(store, { file: TNGTLSU, batch: b, signers: signersFrom(SIGNER_2), actor: ACTOR }, 'MANIFEST_INVALID',
      /^entry 1 \(uniqueId 0123f2408ea1fcf201\): signed by an unknown signer \(x5t#S256 Vx2ZhBEX46-zTyiIYEWQP6eFzCg90ugGjh5epGBM4OM, kid TCnpnzYB8M3CO776ByPJ2yX3KYo\); give its certificate with --trust/);
    // A bare public key cannot name a Microchip signer (they are matched by certificate).
    const pub = join(dir, 'signer5.pub.pem');
    writeFileSync(pub, loadSigners(readFileSync(SIGNER_5), SIGNER_5)[0]!.key.export({ type: 'spki', format: 'pem' }));
    await refusedWithoutTrace(store, { file: TNGTLSU, batch: b, signers: signersFrom(pub), actor: ACTOR }, 'BAD_REQUEST', /give the signer certificate with --trust/);
    await refusedWithoutTrace(store, { file: TNGTLSU, batch: b, signers: [], actor: ACTOR }, 'BAD_REQUEST', /--trust/);
  });

  await t.test('a truncated manifest is refused and stores nothing', async () => {
    const b = await newBatch();
    const text = readFileSync(TNGTLSU);
    const cut = join(dir, 'truncated.json');
    writeFileSync(cut, text.subarray(0, Math.floor(text.length * 0.55)));
    await refusedWithoutTrace(store, { file: cut, batch: b, signers: signersFrom(SIGNER_5), actor: ACTOR }, 'MANIFEST_INVALID', /truncated: entry 6 \(line \d+\) is not complete/);
    writeFileSync(cut, text.subarray(0, text.lastIndexOf(']')));
    await refusedWithoutTrace(store, { file: cut, batch: b, signers: signersFrom(SIGNER_5), actor: ACTOR }, 'MANIFEST_INVALID', /truncated: the JSON array is not closed after entry 10/);
  });

  await t.test('a manifest whose entries carry no public key (ECC608-TMNGTLSS-B) is refused, naming the entry', async () => {
    await refusedWithoutTrace(store, { file: join(MCHP, 'ECC608-TMNGTLSS-B.json'), batch: await newBatch(), signers: signersFrom(SIGNER_5), actor: ACTOR }, 'MANIFEST_INVALID',
      /^entry 1 \(uniqueId 01230cac6606e99401\): the payload has no publicKeySet.keys/);
  });

  await t.test('--ignore-birth-certs registers the JWS-attested keys without their x5c', async () => {
    const b = await newBatch();
    const signer = makeIdentity('O=Test, CN=Manifest Signer T1');
    const key = deviceKey();
    const id = randomUniqueId();
    const bogusX5c = [makeCertificate({ subject: 'CN=untrusted device', spki: key.spki, ca: false, selfKey: key.privateKey })];
    const path = writeJson(dir, 'ignore-x5c.json', [microchipEntry(signer, microchipPayload(id, key, bogusX5c))]);
    const signerPem = join(dir, 'signer-t1.pem');
    writeFileSync(signerPem, signer.certPem);
    await refusedWithoutTrace(store, { file: path, batch: b, signers: signersFrom(signerPem), actor: ACTOR }, 'BIRTH_CERT_INVALID', /^entry 1 \(uniqueId [0-9a-f]+\): birth certificate does not chain to a trusted vendor CA/);
    const report = await importManifest(store, { file: path, batch: b, signers: signersFrom(signerPem), ignoreBirthCertificates: true, actor: ACTOR });
    assert.equal(report.registered, 1);
    assert.equal((await registry.device(id)).hasBirthCertificate, false);
  });

  await t.test('generated manifests: a point off the curve, a bad uniqueId, duplicates; --skip-invalid reports each and imports the rest', async () => {
    const vendor = makeIdentity('O=Test Silicon, CN=Test Silicon Root CA', { ca: true });
    await addVendorCa(store, { vendor: 'test-silicon', pem: vendor.certPem, actor: ACTOR });
    const signer = makeIdentity('O=Test Silicon, CN=Manifest Signer T2');
    const signerPem = join(dir, 'signer-t2.pem');
    writeFileSync(signerPem, signer.certPem);
    const good = () => {
      const key = deviceKey();
      const id = randomUniqueId();
      const birth = makeCertificate({ subject: `CN=sn${id}`, spki: key.spki, ca: false, issuer: vendor });
      return { id, key, entry: microchipEntry(signer, microchipPayload(id, key, [birth])) };
    };
    const g = [good(), good(), good(), good()];
    const offCurve = (() => {
      const key = deviceKey();
      const y = Buffer.from(key.y, 'base64url');
      y[31]! ^= 0x01; // still 32 bytes, no longer on P-256
      return microchipEntry(signer, microchipPayload('0123aaaaaaaaaaaaaa', { x: key.x, y: y.toString('base64url') }));
    })();
    const notHex = microchipEntry(signer, microchipPayload('0123-not-hex', deviceKey()));
    const expiredBirth = (() => {
      const key = deviceKey();
      const birth = makeCertificate({ subject: 'CN=expired', spki: key.spki, ca: false, issuer: vendor, notBefore: new Date(Date.now() - 20 * 86_400_000), notAfter: new Date(Date.now() - 86_400_000) });
      return microchipEntry(signer, microchipPayload('0123bbbbbbbbbbbbbb', key, [birth]));
    })();
    const entries = [g[0]!.entry, offCurve, g[1]!.entry, notHex, g[2]!.entry, g[0]!.entry, expiredBirth, g[3]!.entry];
    const file = writeJson(dir, 'mixed.json', entries);
    const b = await newBatch();
    await refusedWithoutTrace(store, { file, batch: b, signers: signersFrom(signerPem), actor: ACTOR }, 'MANIFEST_INVALID',
      /^entry 2 \(uniqueId 0123aaaaaaaaaaaaaa\): the device key \(JWK x, y\) is not a point on P-256; nothing was imported \(--skip-invalid/);
    const reported: string[] = [];
    const report: ImportReport = await importManifest(store, { file, batch: b, signers: signersFrom(signerPem), skipInvalid: true, actor: ACTOR, onInvalid: (e) => reported.push(e.where) });
    assert.deepEqual([report.entries, report.registered, report.invalidSkipped], [8, 4, 4]);
    // Reported as found: a duplicate only once the whole file has been read (the entries are staged in
    // the import's transaction, not kept in memory); the report lists them in file order.
    assert.deepEqual(reported, ['entry 2 (uniqueId 0123aaaaaaaaaaaaaa)', 'entry 4 (uniqueId 0123-not-hex)', 'entry 7 (uniqueId 0123bbbbbbbbbbbbbb)', `entry 6 (uniqueId ${g[0]!.id})`]);
    assert.deepEqual(report.invalid.map((e) => e.where), ['entry 2 (uniqueId 0123aaaaaaaaaaaaaa)', 'entry 4 (uniqueId 0123-not-hex)', `entry 6 (uniqueId ${g[0]!.id})`, 'entry 7 (uniqueId 0123bbbbbbbbbbbbbb)']);
    assert.match(report.invalid[1]!.reason, /uniqueId "0123-not-hex" is not 1-32 bytes of hex/);
    assert.match(report.invalid[2]!.reason, /the same UDID as entry 1 of this file/);
    assert.equal(report.invalid[3]!.code, 'BIRTH_CERT_INVALID');
    assert.match(report.invalid[3]!.reason, /is not valid at/);
    assert.deepEqual((await registry.listDevices({ batch: b })).items.map((d) => d.udid), g.map((x) => x.id).sort());
    const summary = await store.db.selectFrom('audit_log').select('details').where('action', '=', 'manifest.import').where('target', '=', b).executeTakeFirstOrThrow();
    const details = JSON.parse(summary.details) as { invalidSkipped: number; invalid: string[] };
    assert.equal(details.invalidSkipped, 4);
    assert.match(details.invalid[0]!, /^entry 2 \(uniqueId 0123aaaaaaaaaaaaaa\): /);
    // Idempotent with --skip-invalid too.
    const again = await importManifest(store, { file, batch: b, signers: signersFrom(signerPem), skipInvalid: true, actor: ACTOR });
    assert.deepEqual([again.registered, again.unchanged, again.invalidSkipped], [0, 4, 4]);
  });

  await t.test('protected headers: alg other than ES256, kid and x5t#S256 naming different signers, kid alone', async () => {
    const s1 = makeIdentity('CN=Signer K1');
    const s2 = makeIdentity('CN=Signer K2');
    const pem = join(dir, 'k.pem');
    writeFileSync(pem, s1.certPem + s2.certPem);
    const b = await newBatch();
    const kid = (s: typeof s1) => loadSigners(Buffer.from(s.certPem), 'x')[0]!.kid!;
    const x5t = (s: typeof s1) => loadSigners(Buffer.from(s.certPem), 'x')[0]!.x5tS256!;
    const none = microchipEntry(s1, microchipPayload(randomUniqueId(), deviceKey()), { header: { alg: 'none', kid: kid(s1) } });
    await refusedWithoutTrace(store, { file: writeJson(dir, 'alg.json', [none]), batch: b, signers: signersFrom(pem), actor: ACTOR }, 'MANIFEST_INVALID', /signature algorithm is "none"/);
    const mixed = microchipEntry(s1, microchipPayload(randomUniqueId(), deviceKey()), { header: { alg: 'ES256', kid: kid(s2), 'x5t#S256': x5t(s1) } });
    await refusedWithoutTrace(store, { file: writeJson(dir, 'mixed-kid.json', [mixed]), batch: b, signers: signersFrom(pem), actor: ACTOR }, 'MANIFEST_INVALID', /name different certificates/);
    const byKid = microchipEntry(s2, microchipPayload(randomUniqueId(), deviceKey()), { header: { alg: 'ES256', kid: kid(s2) } });
    const report = await importManifest(store, { file: writeJson(dir, 'kid.json', [byKid]), batch: b, signers: signersFrom(pem), actor: ACTOR });
    assert.equal(report.registered, 1);
    assert.deepEqual(report.signers.map((s) => s.name), ['CN=Signer K2']);
    // The unprotected header is not signed: a uniqueId there that differs from the payload's is refused.
    const lying = microchipEntry(s2, microchipPayload('0123cccccccccccccc', deviceKey()), { header: { alg: 'ES256', kid: kid(s2) }, unprotected: { uniqueId: '0123dddddddddddddd' } });
    await refusedWithoutTrace(store, { file: writeJson(dir, 'lying.json', [lying]), batch: b, signers: signersFrom(pem), actor: ACTOR }, 'MANIFEST_INVALID', /unprotected header's uniqueId 0123dddddddddddddd differs/);
  });

  await t.test('an empty manifest, an unknown batch', async () => {
    await refusedWithoutTrace(store, { file: writeJson(dir, 'empty.json', []), batch: await newBatch(), signers: signersFrom(SIGNER_5), actor: ACTOR }, 'MANIFEST_INVALID', /has no entries/);
    await refusedWithoutTrace(store, { file: TNGTLSU, batch: 'b-000000000000', signers: signersFrom(SIGNER_5), actor: ACTOR }, 'BATCH_NOT_FOUND', /no batch/);
  });

  await t.test('the audit chain still verifies', async () => {
    const verdict = await verifyAuditLog(store.db);
    assert.ok(verdict.ok, JSON.stringify(verdict));
  });
});
