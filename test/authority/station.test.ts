// Offline factory stations, online side (src/authority/station.ts): create (batch, sub-CA key in a
// SoftHSM2 token, package, pending CA without an online key), install (root-signed with pathLen 0, the
// batch's name constraint and notAfter = validUntil), import of journals written by the real station code
// (src/station/), and what revocation can and cannot do for a CA whose key is in a factory. SQLite and
// PostgreSQL.

import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { sql } from 'kysely';
import { Authority } from '../../src/authority/authority.js';
import { signCertificate, signingCa, type SigningCa } from '../../src/authority/certificate-signer.js';
import { CrlPublisher } from '../../src/authority/crl-publisher.js';
import { parseCrl, verifyCrlSignature } from '../../src/protocols/crl/crl.js';
import { initAuthority } from '../../src/authority/init.js';
import { OfflineRoot } from '../../src/authority/offline-root.js';
import { installRootCrl } from '../../src/authority/root-rollover.js';
import { ocspSignerFor } from '../../src/authority/ocsp-signers.js';
import { PROFILES } from '../../src/authority/profiles.js';
import { STATION_PACKAGE_FILES, createStation, decodeNameConstraints, importJournal, installStation, listStations, type CreatedStation } from '../../src/authority/station.js';
import { ConnectionChecker } from '../../src/connect/decision.js';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { parseCertificate, type ParsedCertificate } from '../../src/pki/certificate.js';
import { createCsr, parseCsr, verifyCsr } from '../../src/pki/csr.js';
import { EXT, keyIdentifier } from '../../src/pki/extensions.js';
import { encodeNameString } from '../../src/pki/names.js';
import { decodeOne, encodePem } from '../../src/pki/pem.js';
import { encodeCheckpoint, encodeHeader, encodeIssue, genesisHash } from '../../src/station/journal.js';
import { deviceSubject, parseStationManifest, stationManifestDigest } from '../../src/station/package.js';
import { exportJournal, initStation, signCsrs } from '../../src/station/station.js';
import type { Store } from '../../src/store/database.js';
import { hasCode } from '../helpers/assertions.js';
import { forEachDialect, withDatabaseUrl, type StoreTarget } from '../helpers/db.js';
import { createTestAuthority } from '../helpers/authority.js';
import { test } from 'node:test';
import { createSoftHsmToken, softHsmAvailable, type SoftHsmToken } from '../helpers/softhsm.js';

const PASSPHRASE = 'station test passphrase';
const ORG = 'Acme Devices';
const ACTOR = 'cli:test';
const DAY = 86_400_000;

const skip = !softHsmAvailable() && process.env.CI !== 'true';

interface DeviceKey { readonly privateKey: KeyObject; readonly spki: Buffer; readonly udid: string }

function newKey(): DeviceKey {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, udid: createHash('sha256').update(spki).digest('hex') };
}

const csrPem = (k: DeviceKey): string => encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString('CN=whatever the device says'), privateKey: k.privateKey }));

async function count(store: Store, table: 'stations' | 'batches' | 'certificate_authorities' | 'audit_log' | 'devices' | 'certificates' | 'station_entries'): Promise<number> {
  return Number((await store.db.selectFrom(table).select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow()).n);
}

async function counts(store: Store): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const t of ['stations', 'batches', 'certificate_authorities', 'audit_log', 'devices', 'certificates', 'station_entries'] as const) out[t] = await count(store, t);
  return out;
}

forEachDialect('factory stations, online side', async (t, target: StoreTarget) => {
  if (skip) { t.skip('softhsm2 not installed'); return; }
  const token: SoftHsmToken = await createSoftHsmToken();
  t.after(() => token.cleanup());
  const home = join(target.dir, 'home');
  const rootDir = join(target.dir, 'root');
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir, org: ORG, passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR }));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  t.after(() => authority.close());
  const store = authority.store;
  await authority.registry.createProduct({ name: 'thermostat', validityDays: 730, actor: ACTOR });
  await authority.registry.createLine({ name: 'factory-a', ca: 'issuing-1', actor: ACTOR });
  await authority.registry.createLine({ name: 'factory-b', ca: 'issuing-1', actor: ACTOR });
  const validUntil = new Date(Date.now() + 90 * DAY);
  const keyUri = `pkcs11:token=${token.token}`;

  let n = 0;
  const packageDir = () => join(target.dir, `package-${++n}`);
  const stationDir = () => join(target.dir, `station-${++n}`);

  const create = (o: { line?: string; quota?: number; devices?: { publicKeySpki: Buffer; serialNumber?: string }[]; pin?: string; outDir?: string } = {}) => createStation(authority, {
    line: o.line ?? 'factory-a', quota: o.quota ?? 10, validUntil, keyUri, pin: o.pin ?? token.pin, module: token.module, outDir: o.outDir ?? packageDir(), actor: ACTOR,
    ...(o.devices ? { devices: o.devices } : {}),
  });

  /** The root ceremony: `hallmark root sign` as station create prints it, unless told otherwise. */
  const rootSign = async (s: CreatedStation, o: { permit?: string[] | null; pathLen?: number; notAfter?: Date | null; manifest?: null } = {}): Promise<Buffer> => {
    const root = await OfflineRoot.open(rootDir, PASSPHRASE);
    try {
      const signed = await root.signIntermediate({
        csr: readFileSync(join(s.packageDir, STATION_PACKAGE_FILES.request)),
        pathLen: o.pathLen ?? 0,
        ...(o.permit === null ? {} : { permittedDirectoryNames: o.permit ?? [s.deviceSubjectBase] }),
        ...(o.notAfter === null ? {} : { notAfter: o.notAfter ?? new Date(s.validUntil) }),
        ...(o.manifest === null ? {} : { stationManifestSha256: stationManifestDigest(parseStationManifest(readFileSync(join(s.packageDir, STATION_PACKAGE_FILES.description)))) }),
      });
      return signed.der;
    } finally {
      await root.close();
    }
  };

  const ready = async (o: Parameters<typeof create>[0] = {}): Promise<CreatedStation> => {
    const s = await create(o);
    writeFileSync(join(s.packageDir, STATION_PACKAGE_FILES.certificate), encodePem('CERTIFICATE', await rootSign(s)));
    await installStation(authority, { packageDir: s.packageDir, actor: ACTOR });
    // `hallmark ca list` says where its key is: not online, not in the root directory.
    assert.equal((await authority.listCas()).find((c) => c.name === s.ca)?.keyLocation, 'offline (factory station token)');
    return s;
  };

  /** The factory: station init, sign the CSRs, export; returns the journal and the signed certificates. */
  const factory = async (s: CreatedStation, keys: readonly DeviceKey[], dir = stationDir()): Promise<{ dir: string; journal: Buffer; certificates: Buffer[] }> => {
    if (!existsSync(join(dir, 'station-config.json'))) await initStation({ dir, packageDir: s.packageDir, pin: token.pin, module: token.module });
    const outcomes = await signCsrs({ dir, pin: token.pin, module: token.module, csrs: keys.map((k, i) => ({ source: `csr-${i}`, data: csrPem(k) })) });
    const certificates = outcomes.map((o) => {
      assert.ok(o.ok, o.ok ? '' : o.error.message);
      return o.certificate;
    });
    const out = join(dir, `export-${++n}.jsonl`);
    await exportJournal({ dir, out, pin: token.pin, module: token.module });
    return { dir, journal: readFileSync(out), certificates };
  };

  const auditActions = async (action: string): Promise<Array<{ target: string; details: Record<string, unknown> }>> =>
    (await store.db.selectFrom('audit_log').select(['target', 'details']).where('action', '=', action).orderBy('seq').execute()).map((r) => ({ target: r.target, details: JSON.parse(r.details) as Record<string, unknown> }));

  await t.test('a wrong PIN, an unknown line or a non-empty package directory: refused, nothing stored', async () => {
    const before = await counts(store);
    const out = packageDir();
    await assert.rejects(create({ pin: 'not-the-pin', outDir: out }), hasCode('BAD_PASSPHRASE'));
    assert.ok(!existsSync(out) || readdirSync(out).length === 0, 'no package file written');
    await assert.rejects(create({ line: 'no-such-line' }), hasCode('LINE_NOT_FOUND'));
    const busy = packageDir();
    mkdirSync(busy);
    writeFileSync(join(busy, 'other'), 'x');
    await assert.rejects(create({ outDir: busy }), hasCode('BAD_REQUEST'));
    await assert.rejects(createStation(authority, { line: 'factory-a', quota: 0, validUntil, keyUri, pin: token.pin, module: token.module, outDir: packageDir(), actor: ACTOR }), hasCode('BAD_REQUEST'));
    await assert.rejects(createStation(authority, { line: 'factory-a', quota: 5, validUntil: new Date(Date.now() - DAY), keyUri, pin: token.pin, module: token.module, outDir: packageDir(), actor: ACTOR }), hasCode('BAD_REQUEST'));
    await assert.rejects(createStation(authority, { line: 'factory-a', quota: 5, validUntil, keyUri: 'pkcs11:object=x', pin: token.pin, module: token.module, outDir: packageDir(), actor: ACTOR }), hasCode('BAD_REQUEST'));
    assert.deepEqual(await counts(store), before);
  });

  await t.test('create: a batch with the quota and expiry, the key in the token, a pending CA without an online key, the package and the ceremony command', async () => {
    const s = await create({ quota: 7 });
    assert.deepEqual(readdirSync(s.packageDir).sort(), ['chain.pem', 'station.csr', 'station.json']);
    const manifest = parseStationManifest(readFileSync(join(s.packageDir, 'station.json')));
    assert.equal(manifest.stationId, s.id);
    assert.equal(manifest.line, 'factory-a');
    assert.equal(manifest.product, 'thermostat');
    assert.equal(manifest.batch, s.batch);
    assert.equal(manifest.org, ORG);
    assert.equal(manifest.quota, 7);
    assert.equal(manifest.validUntil, new Date(Math.floor(validUntil.getTime() / 1000) * 1000).toISOString());
    assert.equal(manifest.deviceSubjectBase, `O=${ORG}, OU=thermostat, OU=batch ${s.batch}`);
    assert.equal(manifest.deviceValidityDays, 730);
    assert.equal(manifest.devices, null);
    assert.match(manifest.keyUri, new RegExp(`^pkcs11:token=${token.token};id=%[0-9a-f]{2}`));

    const csr = parseCsr(decodeOne(readFileSync(join(s.packageDir, 'station.csr')), ['CERTIFICATE REQUEST'], 65536));
    await verifyCsr(csr);
    const [rootDer] = await authority.caChain('root', false);
    assert.equal(readFileSync(join(s.packageDir, 'chain.pem'), 'utf8'), encodePem('CERTIFICATE', rootDer!));

    const ca = await authority.directory.caRow(s.ca);
    assert.equal(ca.status, 'pending');
    assert.equal(ca.key_ref, null, 'the server can never sign with a station key');
    assert.equal(ca.ski, keyIdentifier(csr.subjectPublicKeyInfo).toString('hex'));
    const batch = await authority.registry.batch(s.batch);
    assert.equal(batch.quota, 7);
    assert.equal(batch.line, 'factory-a');
    assert.equal(batch.expiresAt, manifest.validUntil);
    assert.equal(batch.allowUnregistered, false);
    const [info] = await listStations(authority, s.id);
    assert.equal(info!.status, 'pending');
    assert.deepEqual((await auditActions('station.create')).at(-1)!.target, s.id);
    // The ceremony command: path length 0, the batch's DN as the only permitted subtree, notAfter = validUntil.
    assert.deepEqual(s.rootSignArgs.slice(0, 3), ['hallmark', 'root', 'sign']);
    const arg = (name: string) => s.rootSignArgs[s.rootSignArgs.indexOf(name) + 1];
    assert.equal(arg('--path-len'), '0');
    assert.equal(arg('--permit-dn'), s.deviceSubjectBase);
    assert.equal(arg('--not-after'), manifest.validUntil);
    assert.equal(arg('--out'), join(s.packageDir, 'station.pem'));
    assert.match(s.rootSignCommand, /--permit-dn 'O=Acme Devices, OU=thermostat, OU=batch b-[0-9a-f]+'/);
    // Nothing issues from it online.
    await assert.rejects(authority.issue({ csr: csrPem(newKey()), ca: s.ca, subject: 'CN=x', actor: ACTOR }), hasCode('CA_NOT_ACTIVE'));
  });

  await t.test('install: refuses a certificate without the constraints, with another path length or validity, of another station, and a package for another line; then installs', async () => {
    const a = await create();
    const b = await create({ line: 'factory-b' });
    const pem = (der: Buffer) => encodePem('CERTIFICATE', der);
    const install = (s: CreatedStation, der: Buffer) => installStation(authority, { packageDir: s.packageDir, certificate: pem(der), actor: ACTOR });
    const before = await counts(store);
    // `hallmark ca install` is not a way around the station's checks.
    await assert.rejects(authority.installCa({ certificate: pem(await rootSign(a)), actor: ACTOR }), (err: Error) => hasCode('CA_CERT_MISMATCH')(err) && /station install/.test(err.message));
    await assert.rejects(install(a, await rootSign(a, { permit: null, manifest: null })), (err: Error) => hasCode('CA_CERT_MISMATCH')(err) && /no name constraints/.test(err.message));
    // A ceremony that did not bind station.json (the root sign command run without --station-manifest).
    await assert.rejects(install(a, await rootSign(a, { manifest: null })), (err: Error) => hasCode('STATION_PACKAGE_INVALID')(err) && /does not carry the digest of station\.json/.test(err.message));
    await assert.rejects(install(a, await rootSign(a, { permit: [`O=${ORG}, OU=thermostat`] })), (err: Error) => hasCode('CA_CERT_MISMATCH')(err) && /must permit exactly/.test(err.message));
    await assert.rejects(install(a, await rootSign(a, { pathLen: 1 })), (err: Error) => hasCode('CA_CERT_MISMATCH')(err) && /path length 0/.test(err.message));
    await assert.rejects(install(a, await rootSign(a, { notAfter: null })), (err: Error) => hasCode('CA_CERT_MISMATCH')(err) && /after the station's validUntil/.test(err.message));
    const bCert = await rootSign(b);
    await assert.rejects(install(a, bCert), (err: Error) => hasCode('STATION_MISMATCH')(err) && err.message.includes(`for station ${b.id} (line factory-b)`));
    // A certificate for the right key but not from this authority's root.
    const rogue = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const rogueSpki = rogue.publicKey.export({ type: 'spki', format: 'der' });
    const rogueCa = signingCa(encodeNameString(`CN=${ORG} Root CA,O=${ORG}`), keyIdentifier(rogueSpki), { ref: { backend: 'file', id: 'rogue', algorithm: 'ecdsa-p256' }, publicKeySpki: rogueSpki, sign: async (d: Buffer) => cryptoSign('sha256', d, rogue.privateKey) });
    const csr = parseCsr(decodeOne(readFileSync(join(a.packageDir, 'station.csr')), ['CERTIFICATE REQUEST'], 65536));
    const forged = await signCertificate(rogueCa, { profile: PROFILES.intermediate, subject: csr.subject, subjectPublicKeyInfo: csr.subjectPublicKeyInfo, subjectKeyKind: 'ecdsa-p256', pathLen: 0, permittedDirectoryNames: [encodeNameString(a.deviceSubjectBase)] });
    await assert.rejects(install(a, forged.der), hasCode('CA_CERT_MISMATCH'));
    // The package of station A edited to say line factory-b (a package for another line).
    const good = await rootSign(a);
    const manifestPath = join(a.packageDir, 'station.json');
    const original = readFileSync(manifestPath, 'utf8');
    writeFileSync(manifestPath, original.replace('"line": "factory-a"', '"line": "factory-b"'));
    await assert.rejects(install(a, good), (err: Error) => hasCode('STATION_MISMATCH')(err) && /line "factory-b" \(recorded: "factory-a"\)/.test(err.message));
    // ... or to raise its quota (HQ compares with its record; the station, which has none, with the digest).
    writeFileSync(manifestPath, original.replace(/"quota": (\d+),/, (_m, q: string) => `"quota": ${Number(q) + 1},`));
    await assert.rejects(install(a, good), (err: Error) => hasCode('STATION_MISMATCH')(err) && /quota 11 \(recorded: 10\)/.test(err.message));
    writeFileSync(manifestPath, original);
    assert.deepEqual(await counts(store), before, 'refused installs change nothing');
    assert.ok(!existsSync(join(a.packageDir, 'station.pem')));

    const r = await install(a, good);
    assert.equal(r.alreadyInstalled, false);
    assert.equal(r.line, 'factory-a');
    const ca = await authority.directory.caRow(a.ca);
    assert.equal(ca.status, 'active');
    assert.equal(ca.key_ref, null);
    assert.equal(ca.path_len, 0);
    assert.equal(readFileSync(join(a.packageDir, 'station.pem'), 'utf8'), pem(good));
    const cert = parseCertificate(good);
    assert.equal(cert.notAfter.toISOString(), new Date(a.validUntil).toISOString());
    const nc = decodeNameConstraints(cert.extensions.get(EXT.nameConstraints)!.value);
    assert.deepEqual(nc.directoryNames, [encodeNameString(a.deviceSubjectBase)]);
    assert.equal((await listStations(authority, a.id))[0]!.status, 'active');
    assert.equal((await auditActions('station.install')).at(-1)!.target, a.id);
    assert.equal((await auditActions('ca.install')).at(-1)!.target, a.ca);
    // Again: nothing changes.
    const again = await installStation(authority, { packageDir: a.packageDir, actor: ACTOR });
    assert.equal(again.alreadyInstalled, true);
    // Still nothing online signs with it.
    await assert.rejects(authority.issue({ csr: csrPem(newKey()), ca: a.ca, subject: 'CN=x', actor: ACTOR }), hasCode('CA_NOT_ACTIVE'));
  });

  await t.test('import: devices registered in the batch, certificates recorded under the station CA, quota counted, audited; the same journal again imports nothing', async () => {
    const s = await ready({ quota: 5 });
    const keys = [newKey(), newKey(), newKey()];
    const first = await factory(s, keys);
    const r = await importJournal(authority, { journal: first.journal, actor: ACTOR });
    assert.deepEqual(r.refused, []);
    assert.deepEqual(r.imported.map((i) => i.seq), [1, 2, 3]);
    assert.ok(r.imported.every((i) => i.newDevice));
    assert.deepEqual(r.quota, { quota: 5, issued: 3, remaining: 2 });
    assert.equal(r.lastSeq, 3);
    const [stationDer] = await authority.caChain(s.ca, false);
    const station = parseCertificate(stationDer!);
    for (const [i, k] of keys.entries()) {
      const device = await authority.registry.device(k.udid);
      assert.equal(device.state, 'provisioned');
      assert.equal(device.batch, s.batch);
      assert.equal(device.line, 'factory-a');
      const rows = await store.db.selectFrom('certificates').selectAll().where('device_udid', '=', k.udid).execute();
      assert.equal(rows.length, 1);
      assert.equal(rows[0]!.issuer_id, (await authority.directory.caRow(s.ca)).id);
      assert.ok(Buffer.from(rows[0]!.der).equals(first.certificates[i]!));
      const cert: ParsedCertificate = parseCertificate(first.certificates[i]!);
      assert.ok(cert.subject.equals(deviceSubject(encodeNameString(s.deviceSubjectBase), k.udid)));
      assert.ok(cert.issuer.equals(station.subject));
    }
    assert.equal((await auditActions('certificate.issue')).filter((e) => e.details.station === s.id).length, 3);
    assert.equal((await auditActions('device.register')).filter((e) => e.details.station === s.id).length, 3);
    assert.equal((await auditActions('station.import')).at(-1)!.details.imported, 3);

    // The connection checker takes the device (chain: the station CA, the root).
    const checker = new ConnectionChecker({ store });
    const ok = await checker.check([first.certificates[0]!, stationDer!]);
    assert.equal(ok.code, 'OK', ok.reason);
    assert.equal(ok.issuer, s.ca);
    await checker.close();

    const replay = await importJournal(authority, { journal: first.journal, actor: ACTOR });
    assert.deepEqual(replay.imported, []);
    assert.deepEqual(replay.alreadyImported, [1, 2, 3]);
    assert.deepEqual(replay.refused, []);
    assert.equal(replay.quota.issued, 3);

    // The station signs two more; the whole journal comes back: only the new entries are imported.
    const more = await factory(s, [newKey(), newKey()], first.dir);
    const second = await importJournal(authority, { journal: more.journal, actor: ACTOR, station: s.id });
    assert.deepEqual(second.imported.map((i) => i.seq), [4, 5]);
    assert.deepEqual(second.alreadyImported, [1, 2, 3]);
    assert.deepEqual(second.quota, { quota: 5, issued: 5, remaining: 0 });
    const [info] = await listStations(authority, s.id);
    assert.equal(info!.imported, 5);
    assert.equal(info!.lastSeq, 5);
    assert.deepEqual(await verifyAuditLog(store.db).then((v) => v.ok), true);
  });

  await t.test('import refuses an edited entry, a forged journal, journals of another or an unknown station, over-quota entries and clones, and imports the rest', async () => {
    // Edited: seq 2's time changed after it was written.
    const s = await ready({ quota: 10 });
    const keys = [newKey(), newKey(), newKey()];
    const { journal } = await factory(s, keys);
    const lines = journal.toString('utf8').split('\n');
    const edited = lines.map((l) => (l.includes('"seq":2,') && l.includes('"type":"issue"') ? l.replace(/"at":"([^"]+)"/, '"at":"2020-01-01T00:00:00.000Z"') : l)).join('\n');
    assert.notEqual(edited, journal.toString('utf8'));
    const r = await importJournal(authority, { journal: edited, actor: ACTOR });
    assert.ok(r.refused.some((p) => p.seq === 2 && p.kind === 'edited'), JSON.stringify(r.refused));
    assert.ok(!r.imported.some((i) => i.seq === 2));
    await assert.rejects(authority.registry.device(keys[1]!.udid), hasCode('DEVICE_NOT_FOUND'));

    // Another station's journal: by --station, by batch, by station certificate; and an unknown station.
    const other = await ready({ line: 'factory-b' });
    const otherJournal = (await factory(other, [newKey()])).journal;
    await assert.rejects(importJournal(authority, { journal: otherJournal, station: s.id, actor: ACTOR }), hasCode('STATION_MISMATCH'));
    const header = JSON.parse(journal.toString('utf8').split('\n')[0]!) as { stationId: string; batch: string; station: string };
    const otherHeader = JSON.parse(otherJournal.toString('utf8').split('\n')[0]!) as { station: string };
    const withHeader = (h: object) => [JSON.stringify(h), ...journal.toString('utf8').split('\n').slice(1)].join('\n');
    await assert.rejects(importJournal(authority, { journal: withHeader({ ...header, batch: 'b-000000000000' }), actor: ACTOR }), hasCode('STATION_MISMATCH'));
    await assert.rejects(importJournal(authority, { journal: withHeader({ ...header, station: otherHeader.station }), actor: ACTOR }), hasCode('STATION_MISMATCH'));
    await assert.rejects(importJournal(authority, { journal: withHeader({ ...header, stationId: 'station-0123456789ab' }), actor: ACTOR }), hasCode('STATION_NOT_FOUND'));
    await assert.rejects(importJournal(authority, { journal: 'not a journal\n', actor: ACTOR }), hasCode('JOURNAL_INVALID'));

    // Forged: a journal made without the token (a rogue key under the station's name), header and all.
    const before = await counts(store);
    const [stationDer] = await authority.caChain(s.ca, false);
    const station = parseCertificate(stationDer!);
    const rogue = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const rogueSigner = { ref: { backend: 'file' as const, id: 'rogue', algorithm: 'ecdsa-p256' as const }, publicKeySpki: rogue.publicKey.export({ type: 'spki', format: 'der' }), sign: async (d: Buffer) => cryptoSign('sha256', d, rogue.privateKey) };
    const rogueCa: SigningCa = signingCa(station.subject, keyIdentifier(station.subjectPublicKeyInfo), rogueSigner, station.notAfter);
    const victim = newKey();
    const fake = await signCertificate(rogueCa, {
      profile: PROFILES.device, subject: deviceSubject(encodeNameString(s.deviceSubjectBase), victim.udid), subjectPublicKeyInfo: victim.spki, subjectKeyKind: 'ecdsa-p256',
      altNames: { uri: [`urn:hallmark:udid:${victim.udid}`] },
    });
    const at = new Date().toISOString();
    const issue = encodeIssue({ seq: 1, at, udid: victim.udid, serialNumber: null, certificate: fake.der, prev: genesisHash(stationDer!) });
    const checkpoint = await encodeCheckpoint({ seq: 1, at, count: 1, prev: issue.hash }, rogueSigner.sign);
    const forgedJournal = [encodeHeader({ stationId: s.id, batch: s.batch, station: stationDer! }), issue.line, checkpoint.line, ''].join('\n');
    const f = await importJournal(authority, { journal: forgedJournal, actor: ACTOR });
    assert.deepEqual(f.imported, []);
    assert.ok(f.refused.some((p) => p.kind === 'forged'), JSON.stringify(f.refused));
    await assert.rejects(authority.registry.device(victim.udid), hasCode('DEVICE_NOT_FOUND'));
    const after = await counts(store);
    assert.equal(after.devices, before.devices);
    assert.equal(after.certificates, before.certificates);

    // Over quota: the batch's quota is shared with online issuance; a device of the batch enrolled online
    // took one unit, so the station's third certificate is beyond the quota.
    const q = await ready({ quota: 3 });
    const online = newKey();
    await authority.registry.registerDevice(q.batch, { publicKeySpki: online.spki }, ACTOR);
    await authority.issueForDevice({ udid: online.udid, csr: csrPem(online), actor: ACTOR });
    // A clone: a key already registered in another batch, which the offline station cannot know.
    const elsewhere = await authority.registry.createBatch({ product: 'thermostat', line: 'factory-b', quota: 10, actor: ACTOR });
    const clone = newKey();
    await authority.registry.registerDevice(elsewhere, { publicKeySpki: clone.spki }, ACTOR);
    const qKeys = [newKey(), clone, newKey()];
    const qJournal = (await factory(q, qKeys)).journal;
    const refusedBefore = (await authority.registry.batch(q.batch)).refused;
    const qr = await importJournal(authority, { journal: qJournal, actor: ACTOR });
    assert.deepEqual(qr.imported.map((i) => i.seq), [1, 3]);
    assert.deepEqual(qr.refused.map((p) => [p.seq, p.kind]), [[2, 'clone']]);
    assert.deepEqual(qr.quota, { quota: 3, issued: 3, remaining: 0 });
    // Over quota: a batch of 2 whose first unit went to a device enrolled online; the station signs 2.
    const fresh = await ready({ quota: 2 });
    const used = newKey();
    await authority.registry.registerDevice(fresh.batch, { publicKeySpki: used.spki }, ACTOR);
    await authority.issueForDevice({ udid: used.udid, csr: csrPem(used), actor: ACTOR });
    const fKeys = [newKey(), newKey()];
    const fr = await importJournal(authority, { journal: (await factory(fresh, fKeys)).journal, actor: ACTOR });
    assert.deepEqual(fr.imported.map((i) => i.seq), [1]);
    assert.deepEqual(fr.refused.map((p) => [p.seq, p.kind]), [[2, 'over-quota']]);
    await assert.rejects(authority.registry.device(fKeys[1]!.udid), hasCode('DEVICE_NOT_FOUND'));
    assert.equal((await authority.registry.batch(fresh.batch)).refused, 1);
    assert.ok((await auditActions('issuance.quota_exceeded')).some((e) => e.target === fKeys[1]!.udid));
    assert.equal((await authority.registry.batch(q.batch)).refused, refusedBefore);
  });

  await t.test('a station for registered devices: the package lists them and the import matches them by key', async () => {
    const keys = [newKey(), newKey()];
    const s = await ready({ quota: 5, devices: keys.map((k, i) => ({ publicKeySpki: k.spki, serialNumber: `SN-${i}` })) });
    const manifest = parseStationManifest(readFileSync(join(s.packageDir, 'station.json')));
    assert.deepEqual(manifest.devices, keys.map((k, i) => ({ udid: k.udid, serialNumber: `SN-${i}`, publicKeySha256: k.udid })));
    for (const k of keys) assert.equal((await authority.registry.device(k.udid)).state, 'registered');
    const r = await importJournal(authority, { journal: (await factory(s, [keys[1]!])).journal, actor: ACTOR });
    assert.deepEqual(r.refused, []);
    assert.deepEqual(r.imported.map((i) => [i.udid, i.newDevice]), [[keys[1]!.udid, false]]);
    const d = await authority.registry.device(keys[1]!.udid);
    assert.equal(d.state, 'provisioned');
    assert.equal(d.serialNumber, 'SN-1');
    assert.equal((await authority.registry.device(keys[0]!.udid)).state, 'registered');
    // A listed key already registered elsewhere is refused at create, and nothing is stored.
    const before = await counts(store);
    await assert.rejects(create({ devices: [{ publicKeySpki: keys[0]!.spki }] }), hasCode('CLONE_DETECTED'));
    assert.deepEqual(await counts(store), before);
  });

  await t.test('a journal of 1,200 devices imports in chunks; the quota cuts it at 1,100 (a station that signed beyond the batch quota)', async () => {
    const s = await ready({ quota: 1200 });
    // The station cannot raise its own quota (station.json is bound to station.pem), but a station whose
    // software was altered could sign beyond it: HQ's batch quota holds at import. Here the batch's quota
    // at HQ is made 1,100 after the package was made for 1,200, which is the same thing seen from HQ.
    await store.db.updateTable('batches').set({ quota: 1100 }).where('id', '=', s.batch).execute();
    const keys = Array.from({ length: 1200 }, () => newKey());
    const { journal } = await factory(s, keys);
    const r = await importJournal(authority, { journal, actor: ACTOR });
    assert.equal(r.imported.length, 1100);
    assert.deepEqual(r.imported.map((i) => i.seq), Array.from({ length: 1100 }, (_, i) => i + 1));
    assert.equal(r.refused.length, 100);
    assert.ok(r.refused.every((p, i) => p.kind === 'over-quota' && p.seq === 1101 + i));
    assert.deepEqual(r.quota, { quota: 1100, issued: 1100, remaining: 0 });
    const stored = await store.db.selectFrom('certificates').select((eb) => eb.fn.countAll().as('n')).where('issuer_id', '=', (await authority.directory.caRow(s.ca)).id).executeTakeFirstOrThrow();
    assert.equal(Number(stored.n), 1100);
    assert.equal((await authority.registry.batch(s.batch)).registered, 1100);
    const again = await importJournal(authority, { journal, actor: ACTOR });
    assert.equal(again.alreadyImported.length, 1100);
    assert.equal(again.imported.length, 0);
    assert.equal(again.refused.length, 100, 'the entries beyond the quota are refused again');
  });

  await t.test('nothing is half-imported when the store fails in the middle of an import', async () => {
    const s = await ready({ quota: 5 });
    const keys = [newKey(), newKey(), newKey()];
    const { journal } = await factory(s, keys);
    if (target.dialect === 'sqlite') {
      await sql`create trigger fail_second_entry before insert on station_entries when new.seq = 2 begin select raise(abort, 'injected failure'); end`.execute(store.db);
    } else {
      await sql.raw(`create function fail_second_entry() returns trigger as $$ begin if new.seq = 2 then raise exception 'injected failure'; end if; return new; end $$ language plpgsql`).execute(store.db);
      await sql`create trigger fail_second_entry before insert on station_entries for each row execute function fail_second_entry()`.execute(store.db);
    }
    const before = await counts(store);
    const issuedBefore = (await authority.registry.batch(s.batch)).issued;
    await assert.rejects(importJournal(authority, { journal, actor: ACTOR }), /injected failure/);
    assert.deepEqual(await counts(store), before);
    assert.equal((await authority.registry.batch(s.batch)).issued, issuedBefore);
    assert.equal((await listStations(authority, s.id))[0]!.lastSeq, 0);
    if (target.dialect === 'sqlite') await sql`drop trigger fail_second_entry`.execute(store.db);
    else await sql`drop trigger fail_second_entry on station_entries`.execute(store.db);
    const r = await importJournal(authority, { journal, actor: ACTOR });
    assert.deepEqual(r.imported.map((i) => i.seq), [1, 2, 3]);
  });

  await t.test('revocation: the device and its certificates are revoked in the store; no CRL or OCSP signer is attempted for the station CA; the connection checker refuses', async () => {
    const s = await ready({ quota: 2 });
    const k = newKey();
    const { journal, certificates } = await factory(s, [k]);
    await importJournal(authority, { journal, actor: ACTOR });
    const [stationDer] = await authority.caChain(s.ca, false);
    const checker = new ConnectionChecker(authority);
    assert.equal((await checker.check([certificates[0]!, stationDer!])).code, 'OK');
    const warnings: string[] = [];
    const publisher = new CrlPublisher(authority, { checkEveryMs: 0, debounceMs: 1, logger: { warn: (_o, msg) => { warnings.push(msg); } } });
    try {
      const result = await authority.revoke({ device: k.udid }, 'keyCompromise', ACTOR);
      assert.equal(result.revoked, 1);
      assert.deepEqual([...result.byIssuer.keys()], [s.ca]);
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.deepEqual(warnings, [], 'a revocation under a station CA is not a CRL failure');
      // The station's only CRL is the empty one its token signed at station create (for relying parties that
      // insist on a CRL per issuer, like Mosquitto): served as is, never re-signed online.
      const stationCrl = await publisher.current(s.ca);
      const parsedCrl = parseCrl(stationCrl.der);
      assert.deepEqual([stationCrl.number, parsedCrl.entries.length], [1, 0]);
      assert.ok(parsedCrl.issuer.equals(parseCertificate(stationDer!).subject) && verifyCrlSignature(parsedCrl, parseCertificate(stationDer!).subjectPublicKeyInfo), 'signed by the station key');
      assert.ok(parsedCrl.nextUpdate! >= parseCertificate(stationDer!).notAfter, 'valid for as long as the station certificates');
      await assert.rejects(publisher.current(s.ca, 'delta'), (err: Error) => hasCode('NOT_FOUND')(err) && /key is offline/.test(err.message));
      await publisher.refreshAll();
      assert.deepEqual(warnings, []);
      // The online CAs still publish.
      assert.equal((await publisher.current('issuing-1')).ca, 'issuing-1');
    } finally {
      await publisher.stop();
    }
    await assert.rejects(ocspSignerFor(authority, s.ca), (err: Error) => hasCode('CA_NOT_ACTIVE')(err) && /no key online/.test(err.message));
    assert.equal((await authority.registry.device(k.udid)).state, 'revoked');
    const row = await store.db.selectFrom('certificates').select(['status', 'revocation_reason']).where('device_udid', '=', k.udid).executeTakeFirstOrThrow();
    assert.deepEqual(row, { status: 'revoked', revocation_reason: 'keyCompromise' });
    const refused = await checker.check([certificates[0]!, stationDer!]);
    assert.equal(refused.allowed, false);
    assert.match(refused.code, /REVOKED/);
    await checker.close();
  });

  await t.test('a compromised station: the root ceremony revokes its CA by name; its certificates are revoked and no further journal is imported', async () => {
    const s = await ready({ quota: 3 });
    const k = newKey();
    const { journal, dir } = await factory(s, [k]);
    await importJournal(authority, { journal, actor: ACTOR });
    const root = await OfflineRoot.open(rootDir, PASSPHRASE);
    let crl: Buffer;
    try {
      const revoked = await root.revokeIntermediate({ ca: s.id, reason: 'keyCompromise' });
      assert.match(revoked.subject, new RegExp(`CN=${ORG} ${s.id}`));
      crl = revoked.crl.der;
    } finally {
      await root.close();
    }
    const installed = await installRootCrl(authority, { crl, actor: ACTOR });
    assert.deepEqual(installed.revoked.map((c) => [c.name, c.certificatesRevoked]), [[s.ca, 1]]);
    assert.equal((await listStations(authority, s.id))[0]!.status, 'revoked');
    const row = await store.db.selectFrom('certificates').select(['status']).where('device_udid', '=', k.udid).executeTakeFirstOrThrow();
    assert.equal(row.status, 'revoked');
    const more = await factory(s, [newKey()], dir);
    await assert.rejects(importJournal(authority, { journal: more.journal, actor: ACTOR }), hasCode('CA_NOT_ACTIVE'));
  });
}, { timeout: 300_000 });


test('root sign for a station: permitted directory names and a notAfter cut-off; bad values refused before signing', async (t) => {
  const ta = await createTestAuthority({ org: 'Root Org' });
  t.after(() => ta.cleanup());
  const root = await OfflineRoot.open(ta.rootDir, ta.passphrase);
  t.after(() => root.close());
  const key = newKey();
  const csr = encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString('CN=Root Org Station 1,O=Root Org'), privateKey: key.privateKey }));
  const base = 'O=Root Org\\, Inc., OU=meter, OU=batch b-1';
  const notAfter = new Date(Math.floor((Date.now() + 30 * DAY) / 1000) * 1000 + 500);
  const journalBefore = (await root.journal()).length;
  await assert.rejects(root.signIntermediate({ csr, permittedDirectoryNames: ['O=x, BOGUS=y'] }), hasCode('BAD_REQUEST'));
  await assert.rejects(root.signIntermediate({ csr, notAfter: new Date(Date.now() - 1000) }), hasCode('BAD_REQUEST'));
  await assert.rejects(root.signIntermediate({ csr, notAfter: new Date(root.certificate.notAfter.getTime() + DAY) }), hasCode('BAD_REQUEST'));
  await assert.rejects(root.signIntermediate({ csr, notAfter, validityDays: 10 }), hasCode('BAD_REQUEST'));
  assert.equal((await root.journal()).length, journalBefore, 'nothing signed');
  const signed = await root.signIntermediate({ csr, pathLen: 0, permittedDirectoryNames: [base], notAfter });
  const cert = parseCertificate(signed.der);
  assert.equal(cert.notAfter.getTime(), Math.floor(notAfter.getTime() / 1000) * 1000, 'cut at the second');
  assert.equal(signed.notAfter.getTime(), cert.notAfter.getTime());
  const nc = cert.extensions.get(EXT.nameConstraints)!;
  assert.equal(nc.critical, true);
  const decoded = decodeNameConstraints(nc.value);
  assert.deepEqual(decoded.directoryNames, [encodeNameString(base)]);
  assert.equal(decoded.other, 0);
  assert.equal(decoded.excluded, false);
  assert.equal((await root.journal()).length, journalBefore + 1);
});
