// A Node gRPC client of chat.v1.ChatService, from the same .proto, as an integrator in
// JavaScript would write it: send one message, then stream the room from just before it.
//   node grpc_client.mjs HOST:PORT TOKEN ROOM CONTENT    -> JSON lines on stdout
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, token, room, content] = process.argv.slice(2);
const protos = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../protos");
const definition = protoLoader.loadSync("chat/v1/chat_service.proto", {
  includeDirs: [protos], keepCase: true, longs: Number, defaults: true,
});
const { ChatService } = grpc.loadPackageDefinition(definition).chat.v1;
const client = new ChatService(address, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${token}`);
const deadline = () => new Date(Date.now() + 5000);

client.SendMessage({ room, content, client_id: `node-${content}` }, metadata, { deadline: deadline() },
  (err, sent) => {
    if (err) { console.error(err.message); process.exit(1); }
    console.log(JSON.stringify({ sent }));
    const stream = client.StreamMessages({ rooms: [room], since_seq: sent.seq - 1 }, metadata);
    stream.on("data", (item) => {
      console.log(JSON.stringify({ item }));
      stream.cancel();
      client.close();
    });
    stream.on("error", (e) => { if (e.code !== grpc.status.CANCELLED) { console.error(e.message); process.exit(1); } });
  });
