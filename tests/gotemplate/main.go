// Renders an Ollama Modelfile TEMPLATE with Go's own text/template, as Ollama does: the template
// sees .System (every system message, joined), .Messages (consecutive messages of one role
// merged), .Prompt and .Response (empty for chat), .Tools (none). Reads
// {"template": "...", "system": "...", "messages": [{"role": ..., "content": ...}]} on stdin, writes the
// text. "system" is the Modelfile's SYSTEM: as Ollama's chat handler does (server/routes.go), it
// becomes a first system message when the conversation does not start with one.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Request struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		msg := msgs[i]
		if msg.Role == "system" {
			system = append(system, msg.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msg.Role {
			collated[len(collated)-1].Content += "\n\n" + msg.Content
		} else {
			collated = append(collated, &msg)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var req Request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "bad request:", err)
		os.Exit(2)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template:", err)
		os.Exit(1)
	}
	msgs := req.Messages
	if len(msgs) > 0 && msgs[0].Role != "system" && req.System != "" {
		msgs = append([]Message{{Role: "system", Content: req.System}}, msgs...)
	}
	system, messages := collate(msgs)
	values := map[string]any{"System": system, "Messages": messages, "Prompt": "", "Response": "", "Tools": nil}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(1)
	}
}
