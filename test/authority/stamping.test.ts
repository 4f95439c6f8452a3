// Factory stamps on both stores: every device registered and every certificate recorded before the
// files; the quota; no repeated serial or key across runs; an interrupted run resumed from the
// stored (encrypted) secrets; the encrypted archive for the factory.

import assert from 'node:assert/strict';
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, X509Certificate } from 'node:crypto';
import { appendFileSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { hostname } from 'node:os';
import { basename, join } from 'node:path';
import type { TestContext } from 'node:test';
import { CompiledQuery } from 'kysely';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { Authority } from '../../src/authority/authority.js';
import { initAuthority } from '../../src/authority/init.js';
import { generateStamps, markFlashed, stampSerialNumber, stampStatus, summaryPage } from '../../src/authority/stamping.js';
import { openArchive } from '../../src/factory/archive.js';
import { formatByName } from '../../src/factory/formats/index.js';
import { base32Decode } from '../../src/factory/stamp.js';
import { sha256Fingerprint } from '../../src/pki/certificate.js';
import { udidOfKey } from '../../src/registry/registry.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../helpers/db.js';
import { hasCode } from '../helpers/assertions.js';

const PASSPHRASE = 'stamping test passphrase';

forEachDialect('stamp generation', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  const rootDir = join(target.dir, 'root');
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir, org: 'Acme', passphrase: PASSPHRASE, keyBackend: 'file', actor: 'test' }));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const registry = authority.registry;
  const db = authority.store.db;
  await registry.createProduct({ name: 'plug', allowServerKeygen: true, actor: 'test' });
  await registry.createProduct({ name: 'sealed', actor: 'test' });
  await registry.createLine({ name: 'line-b', ca: 'issuing-1', actor: 'test' });
  const root = new X509Certificate(readFileSync(join(rootDir, 'root.pem')));
  try {
    await t.test('every device registered and certificate recorded; files in each format decode and chain to the root', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 500, actor: 'test' });
      const out = join(target.dir, 'stamps-1');
      const seen: number[] = [];
      const report = await generateStamps(authority, { batch, count: 300, outDir: out, formats: ['json', 'tlv', 'nvs'], actor: 'test', chunkSize: 128, onProgress: (p) => seen.push(p.done) });
      assert.equal(report.generated, 300);
      assert.equal(seen.at(-1), 300);
      const devices = await db.selectFrom('devices').selectAll().where('batch_id', '=', batch).execute();
      assert.equal(devices.length, 300);
      assert.ok(devices.every((d) => d.state === 'provisioned' && d.udid === udidOfKey(Buffer.from(d.public_key_spki))));
      const certs = await db.selectFrom('certificates').select(['device_udid', 'serial', 'fingerprint_sha256', 'der']).where('device_udid', 'in', devices.map((d) => d.udid)).execute();
      assert.equal(certs.length, 300, 'one recorded certificate per device');
      const stamps = await db.selectFrom('stamps').selectAll().where('batch_id', '=', batch).execute();
      assert.ok(stamps.every((s) => s.pending === null && s.written_at !== null), 'no secret left in the store once written');
      assert.equal((await registry.batch(batch)).issued, 300);

      const files = readdirSync(out);
      assert.equal(files.filter((f) => f.endsWith('.json')).length, 300);
      assert.equal(files.filter((f) => f.endsWith('.bin')).length, 300);
      assert.equal(files.filter((f) => f.endsWith('.nvs.csv')).length, 300);
      const byFingerprint = new Map(certs.map((c) => [c.fingerprint_sha256, c]));
      for (const d of devices.slice(0, 40)) {
        const stamps3 = (['json', 'tlv', 'nvs'] as const).map((f) => { const fmt = formatByName(f); return fmt.decode(readFileSync(join(out, `${d.serial_number}${fmt.extension}`))); });
        for (const s of stamps3) {
          assert.equal(s.udid, d.udid);
          assert.equal(s.serialNumber, d.serial_number);
          assert.equal(s.product, 'plug');
          assert.equal(s.company, 'Acme');
          assert.ok(byFingerprint.has(sha256Fingerprint(s.certificateDer)), 'the stamp carries the recorded certificate');
          // The private key in the stamp is the certificate's key.
          const pub = createPublicKey(createPrivateKey({ key: s.devicePrivateKeyPkcs8!, format: 'der', type: 'pkcs8' })).export({ type: 'spki', format: 'der' });
          assert.ok(pub.equals(Buffer.from(d.public_key_spki)));
          const cert = new X509Certificate(s.certificateDer);
          const issuer = new X509Certificate(s.chainDer[0]!);
          assert.ok(cert.verify(issuer.publicKey) && issuer.verify(root.publicKey));
          assert.match(cert.subject, new RegExp(`CN=${d.udid}`));
          // The QR payload carries the serial number and the PoP secret.
          const fields = s.qrPayload.replace(/^HM1:/, '').split('.').map(base32Decode);
          assert.equal(fields[0]!.toString('utf8'), d.serial_number);
          assert.ok(fields[2]!.equals(s.popSecret));
        }
        assert.deepEqual(stamps3[1], stamps3[0]);
        assert.deepEqual(stamps3[2], stamps3[0]);
      }
      const csv = readFileSync(report.summaryCsv, 'utf8').trim().split(/\r?\n/);
      assert.equal(csv.length, 301);
      for (const line of csv.slice(1)) assert.ok(byFingerprint.has(line.split(',')[2]!.replace(/"/g, '')), line);
      const verdict = await verifyAuditLog(db);
      assert.ok(verdict.ok);
      const issued = await db.selectFrom('audit_log').select('action').where('action', '=', 'certificate.issue').execute();
      assert.ok(issued.length >= 300);
    });

    await t.test('two runs for one batch never repeat a serial number or a key; status counts them', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 100, actor: 'test' });
      await generateStamps(authority, { batch, count: 30, outDir: join(target.dir, 'stamps-2a'), formats: ['json'], actor: 'test' });
      await generateStamps(authority, { batch, count: 30, outDir: join(target.dir, 'stamps-2b'), formats: ['json'], actor: 'test' });
      const devices = await db.selectFrom('devices').select(['udid', 'serial_number', 'public_key_sha256']).where('batch_id', '=', batch).execute();
      assert.equal(devices.length, 60);
      assert.equal(new Set(devices.map((d) => d.serial_number)).size, 60);
      assert.equal(new Set(devices.map((d) => d.public_key_sha256)).size, 60);
      const flashed = await markFlashed(authority, batch, [devices[0]!.serial_number!, devices[1]!.udid, 'NOT-A-SERIAL'], 'test');
      assert.deepEqual({ marked: flashed.marked, unknown: flashed.unknown }, { marked: 2, unknown: ['NOT-A-SERIAL'] });
      const status = await stampStatus(authority, batch);
      assert.deepEqual({ stamped: status.stamped, written: status.written, flashed: status.flashed, enrolled: status.enrolled, runs: status.runs.length }, { stamped: 60, written: 60, flashed: 2, enrolled: 0, runs: 2 });
    });

    await t.test('beyond the quota: refused before anything is made, and audited', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 10, actor: 'test' });
      await assert.rejects(generateStamps(authority, { batch, count: 11, outDir: join(target.dir, 'stamps-3'), formats: ['json'], actor: 'test' }), hasCode('QUOTA_EXCEEDED'));
      assert.equal((await db.selectFrom('devices').select('udid').where('batch_id', '=', batch).execute()).length, 0);
      const refused = await db.selectFrom('audit_log').select('target').where('action', '=', 'issuance.quota_exceeded').where('target', '=', batch).execute();
      assert.equal(refused.length, 1);
    });

    await t.test('a product that does not allow authority-made keys gets no stamps', async () => {
      const batch = await registry.createBatch({ product: 'sealed', line: 'line-b', quota: 10, actor: 'test' });
      await assert.rejects(generateStamps(authority, { batch, count: 1, outDir: join(target.dir, 'stamps-4'), formats: ['json'], actor: 'test' }), hasCode('SERVER_KEYGEN_NOT_ALLOWED'));
    });

    await t.test('an interrupted run resumes: the committed stamps are rewritten from the stored secrets, the rest made', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 400, actor: 'test' });
      const out = join(target.dir, 'stamps-5');
      const options = { batch, count: 200, outDir: out, formats: ['json', 'tlv'] as ('json' | 'tlv')[], actor: 'test', chunkSize: 40 };
      // The process "dies" right after the first chunk is committed and its files written, before they are marked written.
      await assert.rejects(generateStamps(authority, { ...options, onProgress: (p) => { if (p.done >= 40) throw new Error('killed'); } }), /killed/);
      const pending = await db.selectFrom('stamps').select(['udid', 'pending']).where('batch_id', '=', batch).execute();
      // The first chunk's files are written; the next chunks may be committed too (up to three are in flight).
      assert.ok(pending.length >= 40 && pending.length < 200, `${pending.length} stamps recorded`);
      assert.ok(pending.every((p) => p.pending !== null), 'recorded, secrets kept (encrypted) until the files are known to be written');
      assert.ok(!pending.some((p) => Buffer.from(p.pending!).includes(Buffer.from('PRIVATE KEY'))));
      const first = formatByName('json').decode(readFileSync(join(out, readdirSync(out).find((f) => f.endsWith('.json'))!)));

      // Another run for the batch with other settings is refused while this one is unfinished.
      await assert.rejects(generateStamps(authority, { ...options, count: 50 }), hasCode('STAMP_RUN_UNFINISHED'));
      const report = await generateStamps(authority, options);
      assert.equal(report.resumed, true);
      assert.equal(report.rewritten, pending.length);
      assert.equal(report.generated, 200 - pending.length);
      const again = formatByName('json').decode(readFileSync(join(out, `${first.serialNumber}.json`)));
      assert.deepEqual(again, first, 'the rewritten stamp is the same stamp (same key, certificate, secrets)');
      const stamps = await db.selectFrom('stamps').select(['pending', 'written_at']).where('batch_id', '=', batch).execute();
      assert.equal(stamps.length, 200);
      assert.ok(stamps.every((s) => s.pending === null && s.written_at));
      assert.equal(readdirSync(out).filter((f) => f.endsWith('.bin')).length, 200);
      assert.equal((await registry.batch(batch)).issued, 200);
    });

    await t.test('summary pages of a large run are read by (batch, seq), not by sorting the whole run each page', async () => {
      // What went wrong: paging the summary CSV by run_id made SQLite sort all of the run's stamps for
      // every page of 2,000 (12.5 s of a 100,000-stamp run). The plan must walk the (batch_id, seq) index.
      const query = summaryPage(db, 'b-any', 's-any', 0, 2000).compile();
      if (authority.store.dialect === 'sqlite') {
        const plan = (await db.executeQuery<{ detail: string }>(CompiledQuery.raw(`explain query plan ${query.sql}`, [...query.parameters]))).rows.map((r) => r.detail).join(' | ');
        assert.equal(plan, plan.replace(/TEMP B-TREE/g, ''), `no sort: ${plan}`);
        assert.match(plan, /SEARCH s USING INDEX \S+ \(batch_id=\? AND seq>\?\)/, plan);
      } else {
        assert.match(query.sql, /"s"\."batch_id" = \$1 and "s"\."seq" > \$2/);
      }
    });

    await t.test('a stamp file that cannot be written stops the run with its name; the same command finishes once fixed', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 100, actor: 'test' });
      const out = join(target.dir, 'stamps-blocked');
      // A directory where stamp 30's file goes: the write fails with EISDIR.
      const blocked = join(out, `${stampSerialNumber(batch, 30)}.json`);
      mkdirSync(blocked, { recursive: true });
      const options = { batch, count: 64, outDir: out, formats: ['json'] as 'json'[], actor: 'test', chunkSize: 16 };
      await assert.rejects(generateStamps(authority, options), (err: Error) => hasCode('STAMP_WRITE_FAILED')(err) && err.message.includes(`${stampSerialNumber(batch, 30)}.json`));
      const kept = await db.selectFrom('stamps').select(['udid', 'pending']).where('batch_id', '=', batch).execute();
      assert.ok(kept.length >= 32, `${kept.length} stamps recorded`);
      assert.ok(kept.every((k) => k.pending !== null), 'every recorded stamp keeps its secrets: none is known to be on disk yet');
      rmSync(blocked, { recursive: true });
      const report = await generateStamps(authority, options);
      assert.equal(report.resumed, true);
      assert.equal(report.rewritten + report.generated, 64);
      const stamps = await db.selectFrom('stamps').select(['pending', 'written_at']).where('batch_id', '=', batch).execute();
      assert.equal(stamps.length, 64);
      assert.ok(stamps.every((s) => s.pending === null && s.written_at));
      assert.equal(readdirSync(out).filter((f) => f.endsWith('.json')).length, 64);
      const json = formatByName('json').decode(readFileSync(join(out, `${stampSerialNumber(batch, 30)}.json`)));
      assert.equal(json.serialNumber, stampSerialNumber(batch, 30));
      assert.equal((await registry.batch(batch)).issued, 64);
    });

    await t.test('--encrypt-to: one archive for the factory, signed by the issuing CA; no private key in clear on disk', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 100, actor: 'test' });
      const out = join(target.dir, 'stamps-6');
      const factory = generateKeyPairSync('ec', { namedCurve: 'P-256' });
      const report = await generateStamps(authority, { batch, count: 50, outDir: out, formats: ['json', 'tlv'], encryptTo: factory.publicKey.export({ type: 'spki', format: 'der' }), actor: 'test', chunkSize: 16 });
      assert.ok(report.archive);
      const onDisk = readdirSync(out);
      assert.deepEqual(onDisk.filter((f) => f.endsWith('.json') || f.endsWith('.bin')), [], 'no clear stamp files');
      for (const f of onDisk) assert.ok(!readFileSync(join(out, f)).includes(Buffer.from('PRIVATE KEY')), f);
      const names: string[] = [];
      for await (const entry of openArchive({ path: report.archive!, recipientPrivateKey: factory.privateKey, trustedRoots: [root.raw] })) {
        names.push(entry.name);
        if (entry.name.endsWith('.json')) assert.equal(formatByName('json').decode(entry.data).batch, batch);
      }
      assert.equal(names.filter((n) => n.endsWith('.json')).length, 50);
      assert.equal(names.filter((n) => n.endsWith('.bin')).length, 50);
      assert.ok(names.some((n) => n.endsWith('.csv')), 'the summary travels in the archive too');
      const stamps = await db.selectFrom('stamps').select('pending').where('batch_id', '=', batch).execute();
      assert.ok(stamps.every((s) => s.pending === null));
    });

    // A stop after the archive is renamed into place but before the run's last commit is made here by a
    // file system flush that fails (no `sync` on PATH): the state a kill -9 in that window leaves.
    const stopBeforeLastCommit = async (run: () => Promise<unknown>): Promise<void> => {
      const path = process.env.PATH;
      process.env.PATH = join(target.dir, 'no-such-bin');
      try {
        await assert.rejects(run(), hasCode('STAMP_WRITE_FAILED'));
      } finally {
        process.env.PATH = path;
      }
    };
    const archiveNames = async (path: string, factoryKey: ReturnType<typeof generateKeyPairSync>['privateKey']): Promise<string[]> => {
      const names: string[] = [];
      for await (const entry of openArchive({ path, recipientPrivateKey: factoryKey, trustedRoots: [root.raw] })) names.push(entry.name);
      return names;
    };

    await t.test('--encrypt-to stopped after its archive is in place, before the run completed: the next invocation finishes from that archive instead of repeating its stamps in a second part', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 100, actor: 'test' });
      const out = join(target.dir, 'stamps-archive-stop');
      const factory = generateKeyPairSync('ec', { namedCurve: 'P-256' });
      const options = { batch, count: 40, outDir: out, formats: ['json'] as 'json'[], encryptTo: factory.publicKey.export({ type: 'spki', format: 'der' }), actor: 'test', chunkSize: 16 };
      await stopBeforeLastCommit(() => generateStamps(authority, options));
      const parts = readdirSync(out).filter((f) => f.endsWith('.hsa'));
      assert.equal(parts.length, 1);
      const run = await db.selectFrom('stamp_runs').selectAll().where('batch_id', '=', batch).executeTakeFirstOrThrow();
      assert.equal(run.status, 'running');
      assert.equal(run.archive_name, parts[0]);
      assert.equal(run.archive_sha256, createHash('sha256').update(readFileSync(join(out, parts[0]!))).digest('hex'));
      assert.ok((await db.selectFrom('stamps').select('pending').where('batch_id', '=', batch).execute()).every((s) => s.pending !== null), 'secrets kept until the run completes');

      const report = await generateStamps(authority, options);
      assert.equal(report.resumed, true);
      assert.equal(report.generated, 0);
      assert.equal(report.rewritten, 0);
      assert.equal(report.archive, join(out, parts[0]!));
      assert.deepEqual(readdirSync(out).filter((f) => f.endsWith('.hsa') || f.endsWith('.partial')), parts, 'no second part');
      assert.equal((await archiveNames(report.archive!, factory.privateKey)).filter((n) => n.endsWith('.json')).length, 40);
      const after = await db.selectFrom('stamp_runs').select(['status']).where('id', '=', run.id).executeTakeFirstOrThrow();
      assert.equal(after.status, 'complete');
      assert.ok((await db.selectFrom('stamps').select('pending').where('batch_id', '=', batch).execute()).every((s) => s.pending === null));
      const complete = await db.selectFrom('audit_log').select('details').where('action', '=', 'stamp.complete').where('target', '=', run.id).executeTakeFirstOrThrow();
      assert.equal(JSON.parse(complete.details).fromFinishedArchive, true);
      assert.equal((await registry.batch(batch)).issued, 40);
    });

    await t.test('--encrypt-to stopped between recording its archive and renaming it: the next invocation renames the recorded bytes into place', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 100, actor: 'test' });
      const out = join(target.dir, 'stamps-archive-rename');
      const factory = generateKeyPairSync('ec', { namedCurve: 'P-256' });
      const options = { batch, count: 20, outDir: out, formats: ['json'] as 'json'[], encryptTo: factory.publicKey.export({ type: 'spki', format: 'der' }), actor: 'test', chunkSize: 16 };
      await stopBeforeLastCommit(() => generateStamps(authority, options));
      const [part] = readdirSync(out).filter((f) => f.endsWith('.hsa'));
      renameSync(join(out, part!), join(out, `${part}.partial`));
      const report = await generateStamps(authority, options);
      assert.equal(report.generated + report.rewritten, 0);
      assert.deepEqual(readdirSync(out).filter((f) => f.endsWith('.hsa') || f.endsWith('.partial')), [part]);
      assert.equal((await archiveNames(join(out, part!), factory.privateKey)).filter((n) => n.endsWith('.json')).length, 20);
    });

    await t.test('--encrypt-to whose recorded archive was changed afterwards: not trusted; every stamp goes into a new part', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 100, actor: 'test' });
      const out = join(target.dir, 'stamps-archive-changed');
      const factory = generateKeyPairSync('ec', { namedCurve: 'P-256' });
      const options = { batch, count: 20, outDir: out, formats: ['json'] as 'json'[], encryptTo: factory.publicKey.export({ type: 'spki', format: 'der' }), actor: 'test', chunkSize: 16 };
      await stopBeforeLastCommit(() => generateStamps(authority, options));
      const [part] = readdirSync(out).filter((f) => f.endsWith('.hsa'));
      appendFileSync(join(out, part!), Buffer.from([0]));
      const report = await generateStamps(authority, options);
      assert.equal(report.rewritten, 20);
      assert.ok(report.archive && basename(report.archive) !== part);
      assert.equal((await archiveNames(report.archive, factory.privateKey)).filter((n) => n.endsWith('.json')).length, 20);
      const run = await db.selectFrom('stamp_runs').select(['status', 'archive_name']).where('batch_id', '=', batch).executeTakeFirstOrThrow();
      assert.equal(run.status, 'complete');
      assert.equal(run.archive_name, basename(report.archive));
    });

    await t.test('two invocations for one batch at once: the second is refused with STAMP_RUN_BUSY instead of colliding with the first', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 100, actor: 'test' });
      const options = { batch, count: 60, outDir: join(target.dir, 'stamps-twice'), formats: ['json'] as 'json'[], actor: 'test', chunkSize: 16 };
      const [first, second] = await Promise.allSettled([generateStamps(authority, options), generateStamps(authority, options)]);
      const outcomes = [first, second].map((o) => o.status);
      assert.deepEqual(outcomes.slice().sort(), ['fulfilled', 'rejected'], outcomes.join());
      const refused = (first.status === 'rejected' ? first : second) as PromiseRejectedResult;
      assert.ok(hasCode('STAMP_RUN_BUSY')(refused.reason), String(refused.reason));
      assert.match((refused.reason as Error).message, new RegExp(`pid ${process.pid}`));
      const runs = await db.selectFrom('stamp_runs').select(['status', 'owner']).where('batch_id', '=', batch).execute();
      assert.deepEqual(runs.map((r) => [r.status, r.owner]), [['complete', null]]);
      assert.equal((await db.selectFrom('stamps').select('udid').where('batch_id', '=', batch).execute()).length, 60);
    });

    await t.test('an unfinished run is taken over when its owner is gone (a dead pid here, or another host gone quiet) but not while it may be alive', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 100, actor: 'test' });
      const options = { batch, count: 40, outDir: join(target.dir, 'stamps-owner'), formats: ['json'] as 'json'[], actor: 'test', chunkSize: 16 };
      await assert.rejects(generateStamps(authority, { ...options, onProgress: (p) => { if (p.done >= 16) throw new Error('stopped'); } }), /stopped/);
      const run = await db.selectFrom('stamp_runs').select(['id', 'owner']).where('batch_id', '=', batch).executeTakeFirstOrThrow();
      assert.equal(run.owner, null, 'a failed invocation gives its run back');
      const setOwner = (owner: string, heartbeatAt: string) => db.updateTable('stamp_runs').set({ owner, heartbeat_at: heartbeatAt }).where('id', '=', run.id).execute();
      const now = new Date().toISOString();
      assert.equal((await stampStatus(authority, batch)).runs[0]!.madeBy, null, 'interrupted: nobody is making it');
      await setOwner(`another-host.example 4242 abcdef`, now);
      assert.deepEqual((await stampStatus(authority, batch)).runs[0]!.madeBy, { host: 'another-host.example', pid: 4242, lastChunkAt: now });
      await assert.rejects(generateStamps(authority, options), (err: Error) => hasCode('STAMP_RUN_BUSY')(err) && /pid 4242 on another-host\.example/.test(err.message));
      await setOwner(`${hostname()} ${process.pid} abcdef`, now);
      await assert.rejects(generateStamps(authority, options), hasCode('STAMP_RUN_BUSY'));
      const exited = spawnSync(process.execPath, ['-e', '0']).pid!;
      await setOwner(`${hostname()} ${exited} abcdef`, now);
      assert.equal((await stampStatus(authority, batch)).runs[0]!.madeBy, null, 'its process is gone');
      const report = await generateStamps(authority, options);
      assert.equal(report.resumed, true);
      assert.equal(report.rewritten + report.generated, 40);
      const resumed = await db.selectFrom('audit_log').select('details').where('action', '=', 'stamp.resume').where('target', '=', run.id).orderBy('seq', 'desc').executeTakeFirstOrThrow();
      assert.equal(JSON.parse(resumed.details).takenOverFrom, `${hostname()} ${exited}`);
    });

    await t.test('another host that has not committed a chunk for over ten minutes no longer holds the run', async () => {
      const batch = await registry.createBatch({ product: 'plug', line: 'line-b', quota: 100, actor: 'test' });
      const options = { batch, count: 20, outDir: join(target.dir, 'stamps-quiet-host'), formats: ['json'] as 'json'[], actor: 'test', chunkSize: 16 };
      await assert.rejects(generateStamps(authority, { ...options, onProgress: (p) => { if (p.done >= 16) throw new Error('stopped'); } }), /stopped/);
      await db.updateTable('stamp_runs').set({ owner: 'another-host.example 4242 abcdef', heartbeat_at: new Date(Date.now() - 11 * 60_000).toISOString() }).where('batch_id', '=', batch).execute();
      const report = await generateStamps(authority, options);
      assert.equal(report.resumed, true);
    });
  } finally {
    await authority.close();
  }
});
