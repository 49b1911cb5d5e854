// Lockstep from Node.js (@grpc/grpc-js + @grpc/proto-loader): create, update with
// if_version (retry on ABORTED), a denial, logout, and the write refused after it.
// Usage: LOCKSTEP_ADDR=127.0.0.1:50051 ALICE=<jwt> BOB=<jwt> node client.js
'use strict';
const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const root = path.resolve(__dirname, '..', '..');
const def = loader.loadSync(path.join(root, 'proto/lockstep/v1/lockstep.proto'), {
  includeDirs: [path.join(root, 'proto')], keepCase: true, longs: Number, defaults: true, oneofs: true,
});
const pb = grpc.loadPackageDefinition(def).lockstep.v1;
const client = new pb.Lockstep(process.env.LOCKSTEP_ADDR || '127.0.0.1:50051', grpc.credentials.createInsecure());
const { ALICE, BOB } = process.env;

// google.protobuf.Struct from a plain object.
function value(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'number') return { numberValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(value) } };
  return { structValue: struct(v) };
}
function struct(o) {
  return { fields: Object.fromEntries(Object.entries(o).map(([k, v]) => [k, value(v)])) };
}
function call(method, req, token) {
  const md = new grpc.Metadata();
  md.set('authorization', `Bearer ${token}`);
  return new Promise((resolve, reject) => client[method](req, md, (err, res) => (err ? reject(err) : resolve(res))));
}
async function expectCode(code, promise) {
  try {
    await promise;
  } catch (e) {
    if (e.code !== code) throw new Error(`expected ${code}, got ${e.code}: ${e.details}`);
    return e;
  }
  throw new Error(`expected ${code}, got OK`);
}

async function main() {
  const item = `js-${crypto.randomBytes(4).toString('hex')}`;
  const resource = { type: 'Item', id: item };
  let r = await call('AuthorizeAndCommit', {
    mutations: [{ action: 'CreateItem', resource, create: { attributes: struct({ owner: { __entity: { type: 'User', id: 'alice' } }, title: 'From Node', status: 'draft' }) } }],
  }, ALICE);
  console.log(`created Item::${item} version ${r.entities[0].version} (audit seq ${r.audit_seq})`);

  const update = (title, ifVersion) => call('AuthorizeAndCommit', {
    mutations: [{ action: 'UpdateItem', resource, update: { merge_patch: struct({ title }) }, ...(ifVersion === undefined ? {} : { if_version: ifVersion }) }],
  }, ALICE);
  let e = await expectCode(grpc.status.ABORTED, update('stale', 99));
  console.log(`stale if_version: ABORTED (${e.details})`);
  for (let attempt = 0; ; attempt++) {
    const current = (await call('GetEntity', { uid: resource, action: 'ReadItem' }, ALICE)).entity;
    try {
      r = await update('Edited from Node', current.version);
      console.log(`updated with if_version=${current.version}: now version ${r.entities[0].version}`);
      break;
    } catch (err) {
      if (err.code !== grpc.status.ABORTED || attempt >= 4) throw err;
    }
  }
  e = await expectCode(grpc.status.PERMISSION_DENIED, call('AuthorizeAndCommit', {
    mutations: [{ action: 'UpdateItem', resource, update: { merge_patch: struct({ title: 'bob was here' }) } }],
  }, BOB));
  console.log(`bob: PERMISSION_DENIED (${e.details})`);
  await call('RevokeToken', {}, ALICE);
  console.log('alice logged out');
  e = await expectCode(grpc.status.UNAUTHENTICATED, update('after logout'));
  console.log(`write after logout: UNAUTHENTICATED (${e.details})`);
  console.log('node client: all steps as expected');
}

main().catch((err) => { console.error(err.message || err); process.exit(1); });
