module orpotests/gotemplate

go 1.19
